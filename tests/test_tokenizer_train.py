"""Training a tokenizer: sizes that do not fit the text and bad documents named in one line, and the text read
bounded in documents and in bytes."""

import re

import pytest
from tokenizer_helpers import corpus

from ttl_core.errors import TokenizerError
from ttl_core.tokenizer_train import train_tokenizer


def test_vocab_too_large_names_the_size_that_fits():
    with pytest.raises(TokenizerError, match=r"cannot train a 5000-token vocabulary.*largest this text allows is \d+"):
        train_tokenizer(corpus(20), None, vocab_size=5000)


def test_vocab_too_large_is_said_without_sentencepiece_internals():
    """sentencepiece's message names its C++ source line and a failed assertion; the user needs only the size."""
    with pytest.raises(TokenizerError) as e:
        train_tokenizer(corpus(20), None, vocab_size=5000)
    largest = int(re.search(r"the largest this text allows is (\d+)$", str(e.value)).group(1))
    assert not re.search(r"INTERNAL|\.cc\(|pieces_size|Please set", str(e.value)), str(e.value)
    assert train_tokenizer(corpus(20), None, vocab_size=largest).vocab_size == largest


@pytest.mark.parametrize("documents, vocab_size, error", [
    ([], 300, r"no text to train on"),
    (["", "  \n", "\t"], 300, r"no text to train on"),
    (corpus(5), 0, r"vocab_size must be an integer in \[4, 2\*\*31\), got 0"),
    (corpus(5), -3, r"vocab_size must be an integer in \[4, 2\*\*31\), got -3"),
    (corpus(5), 300.5, r"vocab_size must be an integer in \[4, 2\*\*31\), got 300\.5"),
    (corpus(5), None, r"vocab_size must be an integer in \[4, 2\*\*31\), got None"),
    (["casa", b"casa"], 300, r"document 1 is a bytes, not a str"),
    ([None, *corpus(5)], 300, r"document 0 is a NoneType, not a str"),
    (["casa \ud800 x"], 300, r"document 0 is not valid Unicode: character 5 is a lone surrogate"),
])
def test_train_tokenizer_refuses_bad_input_with_a_clear_error(documents, vocab_size, error):
    """Not sentencepiece's internals ('INTERNAL: src/trainer_interface.cc(467) [!sentences_.empty()]', 'cannot
    parse "None" as int') nor Python's (AttributeError, UnicodeEncodeError)."""
    with pytest.raises(TokenizerError, match=error):
        train_tokenizer(documents, None, vocab_size=vocab_size)


def test_an_out_file_in_a_missing_folder_is_refused_before_the_training(tmp_path, monkeypatch):
    """It failed after the training, as a FileNotFoundError naming the atomic write's `.tmp` file."""
    monkeypatch.setattr("sentencepiece.SentencePieceTrainer.train", lambda **_: pytest.fail("trained"))
    with pytest.raises(TokenizerError, match=r"^out '.*/missing/tok.model': '.*/missing' is not an existing folder$"):
        train_tokenizer(corpus(5), tmp_path / "missing" / "tok.model", vocab_size=300)


def test_vocab_too_small_names_the_size_that_fits_and_no_option_ttl_lacks():
    """Below its characters, the 256 byte pieces and the 4 special tokens, sentencepiece refuses a vocabulary
    and advises "--character_coverage", an option neither train_tokenizer nor prepare_data.py takes."""
    with pytest.raises(TokenizerError, match=r"cannot train a 10-token vocabulary.*smallest this text allows") as e:
        train_tokenizer(corpus(20), None, vocab_size=10)
    assert "character_coverage" not in str(e.value)
    smallest = int(re.search(r"smallest this text allows is (\d+)$", str(e.value)).group(1))
    assert train_tokenizer(corpus(20), None, vocab_size=smallest).vocab_size == smallest


def endless(docs: list[str], pulled: list[int]):
    """`docs` over and over, each one read noted in `pulled`."""
    for k in range(100_000):
        pulled.append(k)
        yield docs[k % len(docs)]


def test_train_tokenizer_reads_only_the_documents_it_uses():
    docs, pulled = corpus(300, seed=1), []
    trained = train_tokenizer(endless(docs, pulled), None, vocab_size=320, input_sentence_size=250)
    assert len(pulled) == 250
    assert trained.proto.pieces == train_tokenizer(docs[:250], None, vocab_size=320).proto.pieces


def test_train_tokenizer_reads_no_more_than_its_byte_budget():
    """sentencepiece holds every sentence it is given (a few times its size): documents of a few KB each would
    take a multi-GB corpus whole under the 2M-sentence limit, so the text read is bounded in bytes too."""
    docs, pulled = corpus(300, seed=1), []
    budget = sum(len(d.encode()) for d in docs[:200])
    trained = train_tokenizer(endless(docs, pulled), None, vocab_size=320, input_bytes=budget)
    assert len(pulled) == 201  # the 201st would pass the budget
    assert trained.proto.pieces == train_tokenizer(docs[:200], None, vocab_size=320).proto.pieces


def test_training_sentences_keep_documents_up_to_the_byte_limit_whole_and_cut_longer_ones_losslessly():
    """`_sentences(texts, 8)`: a document of at most 8 UTF-8 bytes is one sentence; a longer one ("ééé\\né" is
    9 bytes) is cut at line breaks, then into pieces of 8 // 4 = 2 characters, none lost; blank ones are dropped."""
    from ttl_core.tokenizer_train import _sentences

    texts = ["abc\ndefg", "ééé\né", " \n ", "", "abcdefghij\n\nkl", "x"]
    assert list(_sentences(texts, 8)) == ["abc\ndefg", "éé", "é", "é", "ab", "cd", "ef", "gh", "ij", "kl", "x"]
