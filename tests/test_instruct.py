"""Instruction tuning: chat templates and prompt masking in both formats, Aira's tokens, LoRA instruction tuning
with a PEFT adapter, evaluation and selection, the generate script on the result, and packed (padding-free)
batches where the attention backend runs packed sequences."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import ttl_core.attention as attention_module
import ttl_kernels
from tests.finetune_helpers import saved_base_model
from tests.helpers import largest, rel_err, run_script
from ttl_core import LlamaConfig, LlamaForCausalLM
from ttl_core.errors import AdapterError, CheckpointError, ConfigError, DataError
from ttl_core.finetune import SAMPLE_DATA, FinetuneConfig
from ttl_core.hf import load_pretrained, save_pretrained
from ttl_core.metrics import read_metrics
from ttl_core.instruct import (add_chat_tokens, build_instruction_data, collate_lm, encode_chat, finetune_instruct,
                               instruction_rows, lm_collator, pack_lm, target_tokens)
from ttl_core.chat_format import AIRA_SPECIAL_TOKENS, chat_prompt, chat_response
from ttl_core.tokenizer import Tokenizer
from ttl_core.tokenizer_train import train_tokenizer


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return saved_base_model(tmp_path_factory.mktemp("base"))


def test_chat_prompts_keep_their_exact_text():
    """Fine-tuning and prompting must see the same bytes: a stray newline or a missing one before the answer
    changes every prompt's tokens (the template test below only encodes what chat_prompt returns)."""
    assert chat_prompt("aira", "Oi?") == "<|startofinstruction|>Oi?<|endofinstruction|>"
    assert chat_prompt("aira", "Oi?", "x") == "<|startofinstruction|>Oi?\nx<|endofinstruction|>"
    assert chat_prompt("alpaca", "Oi?").endswith(". Escreva uma resposta que conclua adequadamente a solicitação."
                                                 "\n\n### Instruções:\nOi?\n\n### Resposta:\n")
    assert chat_prompt("alpaca", "Oi?", "x").endswith(", emparelhada com uma entrada que fornece mais contexto. "
                                                      "Escreva uma resposta que conclua adequadamente a solicitação."
                                                      "\n\n### Instruções:\nOi?\n\n### Entrada:\nx\n\n### Resposta:\n")
    assert chat_response("aira", "Sim.") == "Sim.<|endofcompletion|>" and chat_response("alpaca", "Sim.") == "Sim."


@pytest.mark.parametrize("fmt", ["aira", "alpaca"])
@pytest.mark.parametrize("extra", ["", "O céu está limpo."])
def test_chat_ids_follow_the_template_and_mask_the_prompt(base_dir, fmt, extra):
    tok = Tokenizer.from_pretrained(base_dir)
    if fmt == "aira":
        tok.add_special_tokens([t for t in AIRA_SPECIAL_TOKENS if tok.token_to_id(t) is None])
    ids, labels = encode_chat(tok, fmt, "Descreva o tempo hoje.", extra, "Faz sol e calor.", 512)
    prompt = chat_prompt(fmt, "Descreva o tempo hoje.", extra)
    expected = tok.encode(prompt + chat_response(fmt, "Faz sol e calor."), add_bos=True)
    expected += [tok.eos_id] if fmt == "alpaca" else []
    assert ids == expected and ids[0] == tok.bos_id
    n_prompt = len(tok.encode(prompt, add_bos=True))
    assert ids[:n_prompt] == tok.encode(prompt, add_bos=True)
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert len(labels) > n_prompt
    if fmt == "aira":
        assert ids[-1] == tok.token_to_id("<|endofcompletion|>")
        assert tok.token_to_id("<|startofinstruction|>") in ids and tok.token_to_id("<|endofinstruction|>") in ids
    else:
        assert "### Resposta:" in prompt and ("### Entrada:" in prompt) == bool(extra)
    _, all_labels = encode_chat(tok, fmt, "Descreva o tempo hoje.", extra, "Faz sol e calor.", 512, True)
    assert all_labels == ids
    short_ids, short_labels = encode_chat(tok, fmt, "Descreva o tempo hoje.", extra, "Faz sol e calor.", 10)
    assert short_ids == ids[:10] and short_labels == labels[:10]
    batch = collate_lm([(ids, labels), (ids[:5], labels[:5])], pad_id=3)
    assert batch["input_ids"][1, 5:].eq(3).all() and batch["labels"][1, 5:].eq(-100).all()
    assert batch["attention_mask"][1].tolist() == [1] * 5 + [0] * (len(ids) - 5)


def test_chat_ids_start_with_bos_only_when_the_tokenizer_adds_it(base_dir):
    """The example is framed as the tokenizer frames a text (here: no <s>, as a tokenizer.json template "$A </s>"
    says), except that only Alpaca's answer ends in </s>, once; the prompt is masked all the same."""
    tok = Tokenizer.from_pretrained(base_dir)
    tok.add_bos_token, tok.add_eos_token = False, True
    prompt = chat_prompt("alpaca", "Diga oi.")
    ids, labels = encode_chat(tok, "alpaca", "Diga oi.", "", "Oi.", 512)
    assert ids == tok.encode(prompt + "Oi.", add_eos=False) + [tok.eos_id] and tok.bos_id not in ids
    n_prompt = len(tok.encode(prompt, add_eos=False))
    assert labels == [-100] * n_prompt + ids[n_prompt:] and len(ids) > n_prompt


def test_aira_tokens_are_added_to_the_tokenizer(base_dir):
    """The model's embeddings grow to fit them in finetune_instruct (test_lora_instruction_tuning_saves_a_peft_adapter
    loads the result onto transformers' resized base)."""
    tok = Tokenizer.from_pretrained(base_dir)
    before = tok.vocab_size
    assert add_chat_tokens(tok, "alpaca") == [] and tok.vocab_size == before
    assert add_chat_tokens(tok, "aira") == list(AIRA_SPECIAL_TOKENS)
    assert tok.vocab_size == before + len(AIRA_SPECIAL_TOKENS)
    assert tok.encode("<|endofinstruction|>", add_bos=False) == [tok.token_to_id("<|endofinstruction|>")]
    assert add_chat_tokens(tok, "aira") == []  # a second call finds them
    with pytest.raises(ConfigError, match="unknown chat format"):
        add_chat_tokens(tok, "vicuna")


def test_a_prompt_that_fills_max_length_is_refused_before_the_model_loads(base_dir, tmp_path, monkeypatch):
    """The examples are encoded with the tokenizer (Aira's tokens added) and config.json alone, so a prompt that
    leaves no response token within max_length is refused before the weights load (seconds for ttl-160m). The
    loader is replaced by one that fails; a good file reaching it shows the replacement is the one used."""
    import ttl_core.finetune as finetune
    import ttl_core.instruct as instruct

    def weights_read(*args, **kwargs):
        raise AssertionError("the model was loaded")

    for module in (finetune, instruct):
        monkeypatch.setattr(module, "load_pretrained", weights_read)
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"instruction": "Diga oi, por favor, com calma.", "output": "Oi."}) + "\n")
    cfg = FinetuneConfig(epochs=1, max_length=8)
    with pytest.raises(DataError, match=r"long\.jsonl:1: the prompt fills max_length 8"):
        finetune_instruct(base_dir, path, tmp_path / "out", "aira", cfg, verbose=False)
    with pytest.raises(AssertionError, match="the model was loaded"):
        finetune_instruct(base_dir, path, tmp_path / "out", "aira", FinetuneConfig(epochs=1, max_length=64),
                          verbose=False)


def test_prompt_longer_than_max_length_is_a_clear_error(base_dir, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"instruction": "palavra " * 200, "output": "sim"}) + "\n")
    with pytest.raises(DataError, match=r"long\.jsonl:1: the prompt fills max_length 64"):
        build_instruction_data(path, Tokenizer.from_pretrained(base_dir), "alpaca", 64)
    path.write_text(json.dumps({"question": "?", "output": "sim"}) + "\n")
    with pytest.raises(DataError, match=r"long\.jsonl:1: no text field among instruction, prompt"):
        build_instruction_data(path, Tokenizer.from_pretrained(base_dir), "alpaca", 64)
    for record in ({"instruction": "Diga oi.", "output": " \n"}, {"instruction": " ", "output": "Oi."}):
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(DataError, match=r"long\.jsonl:1: empty instruction or response"):
            build_instruction_data(path, Tokenizer.from_pretrained(base_dir), "alpaca", 64)
    # a non-text input is refused whether or not it is falsy (0 was read as no input, 5 refused); null is no input
    for extra in (0, False, [], 5):
        path.write_text(json.dumps({"instruction": "Dobre.", "input": extra, "output": "0"}) + "\n")
        with pytest.raises(DataError, match=r"long\.jsonl:1: field 'input' must be text"):
            instruction_rows(path)
    path.write_text(json.dumps({"instruction": "Dobre.", "input": None, "output": "0"}) + "\n")
    assert instruction_rows(path) == [(1, "Dobre.", "", "0")]
    # JSON may escape half a UTF-16 pair, which no text has: the tokenizer found it, in no named file
    for field in ("instruction", "input", "output"):
        path.write_text(json.dumps({"instruction": "Dobre.", "input": "", "output": "0", field: "meio \ud83d"}))
        with pytest.raises(DataError, match=rf"long\.jsonl:1: '{field}' holds a lone surrogate '\\ud83d' at "
                                            r"character 5 \(half an escaped UTF-16 pair\)$"):
            build_instruction_data(path, Tokenizer.from_pretrained(base_dir), "alpaca", 64)


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_an_example_is_refused_only_where_max_length_leaves_no_target(base_dir, train_on_inputs):
    """The first label is never a target (nothing predicts it); any later label that is not -100 is. One response
    token kept after the prompt is enough, as is, trained on the inputs, a second token of the prompt."""
    tok = Tokenizer.from_pretrained(base_dir)
    rows = [(1, "Diga oi.", "", "Oi, tudo bem?")]
    n_prompt = len(tok.encode(chat_prompt("alpaca", "Diga oi."), add_eos=False))
    shortest = 2 if train_on_inputs else n_prompt + 1
    [(ids, labels)] = build_instruction_data("x.jsonl", tok, "alpaca", shortest, train_on_inputs, rows)
    assert len(ids) == shortest and sum(label != -100 for label in labels[1:]) == 1
    with pytest.raises(DataError, match=rf"x\.jsonl:1: the prompt fills max_length {shortest - 1}"):
        build_instruction_data("x.jsonl", tok, "alpaca", shortest - 1, train_on_inputs, rows)


def test_lora_instruction_tuning_saves_a_peft_adapter(base_dir, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from ttl_core.lora_files import load_adapter

    cfg = FinetuneConfig(lr=1e-3, batch_size=8, epochs=2, max_length=256, lora=True)
    summary = finetune_instruct(base_dir, SAMPLE_DATA / "instrucoes_pt.jsonl", tmp_path, "aira", cfg, verbose=False)
    assert summary["added_tokens"] == list(AIRA_SPECIAL_TOKENS)
    adapter = tmp_path / "best"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 8, 16, 0.05)
    assert set(config["target_modules"]) == {"q_proj", "v_proj"}
    assert config["modules_to_save"] == ["embed_tokens", "lm_head"]
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    tokenizer = Tokenizer.from_pretrained(adapter)
    assert tokenizer.vocab_size == Tokenizer.from_pretrained(base_dir).vocab_size + len(AIRA_SPECIAL_TOKENS)
    # peft loads it onto transformers' model of the base (resized the same way) ...
    hf = transformers.LlamaForCausalLM.from_pretrained(base_dir)
    hf.resize_token_embeddings(tokenizer.vocab_size)
    tuned = peft.PeftModel.from_pretrained(hf, adapter).eval()
    # ... and our loader gives the same logits on a chat prompt
    ours = load_pretrained(base_dir)
    ours.resize_token_embeddings(tokenizer.vocab_size)
    load_adapter(ours, adapter)
    ids = torch.tensor([tokenizer.encode(chat_prompt("aira", "Qual é a capital do Brasil?"), add_bos=True)])
    with torch.no_grad():
        assert (ours.eval()(ids).logits - tuned(input_ids=ids).logits).abs().max() <= 1e-4


def test_chat_tokens_added_into_padding_rows_are_trained(base_dir, tmp_path):
    """A base whose vocabulary is padded past its tokenizer needs no resize for Aira's tokens, but their rows
    were never trained: LoRA instruction tuning still trains and saves the embeddings in full."""
    padded = load_pretrained(base_dir)
    padded.resize_token_embeddings(padded.config.vocab_size + 16)
    save_pretrained(padded, tmp_path / "padded", tokenizer=Tokenizer.from_pretrained(base_dir))
    data = tmp_path / "few.jsonl"
    data.write_text("".join((SAMPLE_DATA / "instrucoes_pt.jsonl").read_text().splitlines(keepends=True)[:8]))
    cfg = FinetuneConfig(lr=1e-3, batch_size=8, epochs=1, max_length=128, lora=True)
    summary = finetune_instruct(tmp_path / "padded", data, tmp_path / "out", "aira", cfg, verbose=False)
    assert summary["added_tokens"] == list(AIRA_SPECIAL_TOKENS)
    config = json.loads((tmp_path / "out" / "best" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["embed_tokens", "lm_head"]


def test_aira_tuning_is_seeded_stops_at_end_of_completion_and_pads_without_a_pad_token(base_dir, tmp_path,
                                                                                       monkeypatch):
    """The same --seed gives the same adapter (LoRA's A and the new rows came from an unseeded RNG); the saved
    generation_config.json lists `<|endofcompletion|>` as an EOS, so transformers' generate() stops where the
    answers were trained to end; a base with no pad token pads with EOS instead of -1."""
    transformers = pytest.importorskip("transformers")
    data = tmp_path / "few.jsonl"
    data.write_text("".join((SAMPLE_DATA / "instrucoes_pt.jsonl").read_text().splitlines(keepends=True)[:8]))
    cfg = FinetuneConfig(lr=1e-3, batch_size=4, epochs=1, max_length=128, lora=True, seed=3)
    for run in ("a", "b"):
        finetune_instruct(base_dir, data, tmp_path / run, "aira", cfg, verbose=False)
    adapters = [load_file(tmp_path / run / "best" / "adapter_model.safetensors") for run in ("a", "b")]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])

    no_pad = load_pretrained(base_dir)
    no_pad.config = no_pad.config.replace(pad_token_id=None)
    save_pretrained(no_pad, tmp_path / "no_pad", tokenizer=Tokenizer.from_pretrained(base_dir))
    monkeypatch.setattr(Tokenizer, "pad_id", property(lambda self: -1))
    merged = FinetuneConfig(lr=1e-3, batch_size=4, epochs=1, max_length=128, lora=True, merge_lora=True)
    finetune_instruct(tmp_path / "no_pad", data, tmp_path / "merged", "aira", merged, verbose=False)
    tok = Tokenizer.from_pretrained(tmp_path / "merged" / "best")
    settings = transformers.GenerationConfig.from_pretrained(tmp_path / "merged" / "best")
    assert settings.eos_token_id == [tok.eos_id, tok.token_to_id("<|endofcompletion|>")]


def test_generate_script_runs_an_instruction_adapter_merged_into_its_base(base_dir, tmp_path):
    """scripts/generate.py --model on the PEFT adapter finetune_instruct saves: the base it names, grown to the
    adapter's vocabulary (Aira's tokens), with the adapter merged, streams what ttl_core.generate gives on
    that merged model; --base finds a base that moved; a missing base or a classifier's adapter is one line."""
    import ttl_core
    from ttl_core.lora import merge_lora
    from ttl_core.lora_files import load_adapter, load_with_adapter

    base = Path(shutil.copytree(base_dir, tmp_path / "base"))
    data = tmp_path / "few.jsonl"
    data.write_text("".join((SAMPLE_DATA / "instrucoes_pt.jsonl").read_text().splitlines(keepends=True)[:4]))
    cfg = FinetuneConfig(lr=1e-2, batch_size=4, epochs=1, max_length=128, lora=True)
    finetune_instruct(base, data, tmp_path / "run", "aira", cfg, verbose=False)
    adapter = tmp_path / "run" / "best"
    assert not (adapter / "config.json").exists()
    tok = Tokenizer.from_pretrained(adapter)
    merged = load_pretrained(base)
    merged.resize_token_embeddings(tok.vocab_size)
    merge_lora(load_adapter(merged, adapter))
    question = "Qual é a capital do Brasil?"
    ids = tok.encode(chat_prompt("aira", question))
    out = ttl_core.generate(merged, torch.tensor([ids]), max_new_tokens=12, repetition_penalty=1.2,
                            eos_token_id=[tok.eos_id, tok.token_to_id("<|endofcompletion|>")], pad_token_id=tok.pad_id)
    expected = tok.decode(out[0, len(ids):].tolist()) + "\n"
    args = ["--prompt", question, "--chat", "aira", "--greedy", "--max-new-tokens", "12", "--device", "cpu"]
    run = run_script("generate", "--model", adapter, *args)
    assert run.returncode == 0 and run.stdout == expected, run.stderr

    moved = base.rename(tmp_path / "moved")
    with pytest.raises(CheckpointError) as e:
        load_with_adapter(adapter)
    assert str(e.value) == (f"{base}: no such base model directory (base_model_name_or_path in "
                            f"{adapter / 'adapter_config.json'}; pass its new place as base=, --base in the scripts)")
    run = run_script("generate", "--model", adapter, "--base", moved, *args)
    assert run.returncode == 0 and run.stdout == expected, run.stderr
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "task_type": "SEQ_CLS"}))
    with pytest.raises(AdapterError, match=rf"^{re.escape(str(adapter))}: a SEQ_CLS adapter, not a causal LM's"):
        load_with_adapter(adapter, base=moved)


def test_a_prompt_token_merged_with_the_response_is_trained_on():
    """A tokenizer trained on Alpaca prompts has a "\\n\\n" piece: the prompt's closing "\\n" and a response that
    starts with "\\n" encode as one token across the boundary, which is partly response and so is not masked;
    every token before it is."""
    rng = random.Random(0)
    words = "a casa de o menino foi para escola com seu cachorro ontem à noite e não voltou mais".split()
    docs = [chat_prompt("alpaca", " ".join(rng.choices(words, k=6))) + "\n" + " ".join(rng.choices(words, k=8))
            for _ in range(200)]
    tok = train_tokenizer(docs, None, vocab_size=300)
    prompt_ids = tok.encode(chat_prompt("alpaca", "Diga oi."))
    ids, labels = encode_chat(tok, "alpaca", "Diga oi.", "", "\nSim.", 512)
    n = len(prompt_ids) - 1  # the prompt's last token, "\n", merged with the response's
    assert ids[:n] == prompt_ids[:n] and ids[n] != prompt_ids[n] and tok.id_to_token(ids[n]) == "\n\n"
    assert labels == [-100] * n + ids[n:]


def test_lm_eval_loss_is_the_mean_over_all_target_tokens(base_dir):
    """Batches of 2 over 3 examples of different lengths, trained on their inputs too (the label at position 0
    is no target: nothing predicts it): the mean of each token's cross entropy, over all examples, with the model
    in eval mode (LoRA's dropout off) whatever mode it was left in."""
    from ttl_core.instruct import lm_eval_loss
    from ttl_core.lora import apply_lora, lora_layers

    tok, model = Tokenizer.from_pretrained(base_dir), load_pretrained(base_dir)
    apply_lora(model, r=4, alpha=8, dropout=0.5)
    for layer in lora_layers(model).values():  # B starts at zero, which would hide the dropout
        for b in layer.lora_B.values():
            torch.nn.init.normal_(b.weight, std=0.5)
    model.eval()
    examples = [encode_chat(tok, "alpaca", instruction, "", response, 512, train_on_inputs=True)
                for instruction, response in (("Diga oi.", "Oi."), ("Conte até três.", "Um, dois, três."),
                                              ("Qual é a capital do Brasil?", "Brasília."))]
    total = count = 0.0
    with torch.no_grad():
        for ids, labels in examples:
            logits = model(torch.tensor([ids])).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, torch.tensor(labels[1:]), reduction="sum").item()
            count += len(labels) - 1
    model.train()
    assert lm_eval_loss(model, examples, 2, tok.pad_id, torch.device("cpu")) == pytest.approx(total / count, rel=1e-5)
    assert model.training


def test_instruction_tuning_keeps_the_first_lowest_eval_loss(base_dir, tmp_path, monkeypatch):
    """With scripted eval losses 2, 1, 1 the model is saved after epochs 1 and 2 only (a tie is no improvement);
    final_loss is the last logged training loss. Alpaca adds no tokens, so LoRA trains no embeddings in full, and
    its answers end with the base's EOS alone."""
    import ttl_core.instruct as instruct

    losses, evaluated, saved = iter([2.0, 1.0, 1.0]), [], []

    def scripted_eval_loss(*args):
        evaluated.append(True)
        return next(losses)

    monkeypatch.setattr(instruct, "lm_eval_loss", scripted_eval_loss)
    monkeypatch.setattr(instruct, "save_finetuned", lambda model, *args: saved.append(  # the epoch, the EOS ids
        (len(evaluated), (model.generation_config or {}).get("eos_token_id"))))
    lora_modules_to_save = []
    start_lora = instruct.start_lora
    monkeypatch.setattr(instruct, "start_lora", lambda model, cfg, modules_to_save: (
        lora_modules_to_save.append(modules_to_save), start_lora(model, cfg, modules_to_save=modules_to_save)))
    data = tmp_path / "few.jsonl"
    data.write_text("".join((SAMPLE_DATA / "instrucoes_pt.jsonl").read_text().splitlines(keepends=True)[:4]))
    cfg = FinetuneConfig(lr=1e-3, batch_size=4, epochs=3, max_length=512, lora=True)
    summary = finetune_instruct(base_dir, data, tmp_path / "out", "alpaca", cfg, eval_file=data, verbose=False)
    base_eos = (load_pretrained(base_dir).generation_config or {}).get("eos_token_id")  # Aira's end is no EOS here
    assert saved == [(1, base_eos), (2, base_eos)] and summary["best"] == {"epoch": 2, "eval_loss": 1.0}
    assert summary["added_tokens"] == [] and lora_modules_to_save == [None]  # no new rows to train in full
    assert [h["eval_loss"] for h in summary["history"]] == [2.0, 1.0, 1.0]
    train_losses = [r["loss"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert len(train_losses) == 3 and summary["final_loss"] == train_losses[-1] != train_losses[0]


# --- packed batches ---------------------------------------------------------------------------------------------

def tiny_lm(attention: str) -> LlamaForCausalLM:
    """A random causal LM with one head of 64 dims (a head size the Triton attention kernel runs)."""
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=64, attention=attention)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def random_examples(train_on_inputs: bool = False) -> list[tuple[list[int], list[int]]]:
    """Examples of 9, 17 and 5 tokens (ids 1..99: 0 pads) whose first 4, 6 and 2 tokens are the prompt."""
    gen = torch.Generator().manual_seed(0)
    examples = []
    for length, prompt in ((9, 4), (17, 6), (5, 2)):
        ids = torch.randint(1, 100, (length,), generator=gen).tolist()
        examples.append((ids, list(ids) if train_on_inputs else [-100] * prompt + ids[prompt:]))
    return examples


@pytest.mark.parametrize("lora", [False, True])
def test_packed_batches_give_the_loss_and_gradients_of_padded_ones(lora, monkeypatch):
    """The same examples packed into one row, through our Triton attention kernel's varlen path (interpreted here),
    give the loss and the gradients (every weight's, or LoRA's) of their right-padded batch, whose padding mask
    sends attention to SDPA; the loss averages over the same number of target tokens."""
    from ttl_core.lora import apply_lora

    model = tiny_lm("triton")
    if lora:
        apply_lora(model, r=4, alpha=8, dropout=0.0, targets="all-linear")
        with torch.no_grad():  # B starts at zero, which would leave every A without a gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    packed_calls, flash_attention = [], ttl_kernels.flash_attention

    def counted_flash_attention(*args, **kwargs):
        packed_calls.append(kwargs.get("cu_seqlens") is not None)
        return flash_attention(*args, **kwargs)

    monkeypatch.setattr(ttl_kernels, "flash_attention", counted_flash_attention)
    examples = random_examples()
    assert lm_collator(model, "float32", pad_id=0) is pack_lm
    results = []
    for batch in (collate_lm(examples, pad_id=0), pack_lm(examples)):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), target_tokens(batch), grads))
    assert packed_calls == [True] * model.config.num_hidden_layers  # the packed forward ran the Triton kernel
    (padded_loss, padded_targets, padded_grads), (packed_loss, packed_targets, packed_grads) = results
    assert abs(packed_loss - padded_loss) <= 1e-5 and packed_targets == padded_targets == 19
    assert all("lora_" in name for name in padded_grads) == lora
    for name, grad in padded_grads.items():
        assert rel_err(packed_grads[name], grad) <= 1e-4, name


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_packed_batches_on_cuda_in_bf16_are_as_close_to_fp32_as_padded_ones(backend):
    """On the GPU, under a fine-tuning run's bf16 autocast, the varlen kernel (ours compiled, or flash-attn's, which
    "auto" picks in bf16) runs the packed batch: its loss and gradients are as near the fp32 padded batch's as the
    padded bf16 batch's (SDPA) are, by the flash-attn criterion (at most twice that error, or 1e-2)."""
    from ttl_core.finetune import to_device
    from ttl_core.step import autocast

    if backend == "auto" and attention_module.flash_attn_module() is None:
        pytest.skip("flash-attn is not installed")
    model = tiny_lm(backend).cuda()
    assert lm_collator(model, "bfloat16", pad_id=0) is pack_lm
    examples, device = random_examples(), torch.device("cuda")

    def loss_and_grads(batch: dict, dtype: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        with autocast(device, dtype):
            loss = model(**to_device(batch, device)).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    padded = collate_lm(examples, pad_id=0)
    truth_loss, truth_grads = loss_and_grads(padded, "float32")
    padded_loss, padded_grads = loss_and_grads(padded, "bfloat16")
    packed_loss, packed_grads = loss_and_grads(pack_lm(examples), "bfloat16")
    assert rel_err(packed_loss, truth_loss) <= max(1e-2, 2 * rel_err(padded_loss, truth_loss))
    for name, grad in packed_grads.items():
        assert rel_err(grad, truth_grads[name]) <= max(1e-2, 2 * rel_err(padded_grads[name], truth_grads[name])), name


def test_a_packed_batch_has_no_target_across_examples():
    """Trained on the inputs too, every label is a token, so a plain concatenation would train each example's last
    token to predict the next example's first. Packed, each example's targets after the model's one-token shift
    are exactly those of its padded row, and nothing is predicted across a boundary; positions restart."""
    examples = random_examples(train_on_inputs=True)
    lengths = [len(ids) for ids, _ in examples]
    packed, padded = pack_lm(examples), collate_lm(examples, pad_id=0)
    assert packed["input_ids"].tolist() == [[token for ids, _ in examples for token in ids]]
    assert packed["position_ids"].tolist() == [[p for n in lengths for p in range(n)]]
    assert packed["cu_seqlens"].tolist() == [0, 9, 26, 31] and packed["max_seqlen"] == 17
    shift = lambda labels: F.pad(labels[:, 1:], (0, 1), value=-100)  # noqa: E731  (the model's shift)
    packed_targets = shift(packed["labels"])[0].split(lengths)
    padded_targets = shift(padded["labels"])
    for row, n in enumerate(lengths):
        assert torch.equal(packed_targets[row], padded_targets[row, :n])
        assert packed_targets[row][-1] == -100  # the last token predicts nothing
    assert target_tokens(packed) == target_tokens(padded) == sum(n - 1 for n in lengths)


def test_lm_batches_are_packed_only_where_attention_runs_packed_sequences(monkeypatch):
    """SDPA and eager keep the right-padded batches (a block-diagonal mask over a whole packed row would cost more
    than the padding); Triton packs, and so does "auto" where it resolves to flash-attn, as `resolve_backend`
    decides for the model's device and the compute dtype (autocast's, not the fp32 parameters')."""
    examples = random_examples()
    monkeypatch.delenv("TTL_ATTENTION", raising=False)
    for backend in ("sdpa", "eager", "auto"):  # "auto" is SDPA on a CPU
        batch, padded = lm_collator(tiny_lm(backend), "float32", pad_id=0)(examples), collate_lm(examples, pad_id=0)
        assert batch.keys() == padded.keys() and all(torch.equal(batch[k], padded[k]) for k in batch), backend
    assert lm_collator(tiny_lm("triton"), "bfloat16", pad_id=0) is pack_lm
    auto = tiny_lm("auto")
    monkeypatch.setenv("TTL_ATTENTION", "triton")
    assert lm_collator(auto, "float32", pad_id=0) is pack_lm
    monkeypatch.delenv("TTL_ATTENTION")
    asked = []
    monkeypatch.setattr(attention_module, "flash_attn_usable", lambda q: asked.append(q.dtype) or True)
    assert lm_collator(auto, "bfloat16", pad_id=0) is pack_lm and asked == [torch.bfloat16]


def test_instruction_tuning_with_triton_attention_packs_and_trains_as_padded(base_dir, tmp_path, monkeypatch):
    """finetune_instruct with TTL_ATTENTION=triton (interpreted here) trains and evaluates on packed rows, and its
    step losses and eval loss are the padded SDPA run's up to fp32 rounding (LoRA without dropout, whose masks
    would be drawn for differently shaped batches)."""
    data = tmp_path / "few.jsonl"
    data.write_text("".join((SAMPLE_DATA / "instrucoes_pt.jsonl").read_text().splitlines(keepends=True)[:8]))
    cfg = FinetuneConfig(lr=1e-2, batch_size=4, epochs=1, max_length=128, lora=True, lora_dropout=0.0)
    runs = {}
    for backend in ("sdpa", "triton"):
        monkeypatch.setenv("TTL_ATTENTION", backend)
        summary = finetune_instruct(base_dir, data, tmp_path / backend, "aira", cfg, eval_file=data, verbose=False)
        losses = [r["loss"] for r in read_metrics(tmp_path / backend / "metrics.jsonl") if "loss" in r]
        runs[backend] = summary["packed"], losses + [summary["history"][0]["eval_loss"]]
    assert runs["sdpa"][0] is False and runs["triton"][0] is True
    assert len(runs["triton"][1]) == 3 and \
        largest(abs(a - b) for a, b in zip(runs["sdpa"][1], runs["triton"][1])) <= 1e-5
