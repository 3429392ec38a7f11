"""Generate text with a ttl or Hugging Face checkpoint, streaming the output as it is produced.

  python scripts/generate.py --model DIR --prompt "Qual é a capital do Brasil?" [--chat aira|alpaca]
  python scripts/generate.py --model DIR --chat aira --interactive
  python scripts/generate.py --model runs/finetune-instruct/best --chat aira --prompt "..." [--base BASE_DIR]

Sampling defaults are the ones the TeenyTinyLlama model card suggests (repetition penalty 1.2, temperature 0.2, top-k
20, top-p 0.2, 150 new tokens); `--greedy` decodes greedily instead (and refuses the sampling options and --seed).
`--chat` wraps the prompt in the Aira (`<|startofinstruction|>` ... `<|endofinstruction|>`) or Alpaca-PTBR format and
stops at the end of the answer; any answer also ends at the tokenizer's `</s>`, at the checkpoint's EOS ids (its
generation_config.json's, else config.json's, as transformers reads them) and at its generation_config.json's
stop_strings. `--interactive` keeps a conversation in that format, one turn per input line, until the model's context is
full (an empty line or end of input quits). `--assistant DIR` has a smaller checkpoint with the same tokenizer draft
tokens that --model verifies several at a time (assisted decoding, as transformers' `assistant_model`): greedy
answers are --model's own, sampled ones follow its distribution.

--model may also be a PEFT adapter directory (what scripts/finetune_instruct.py saves by default): its base
model (adapter_config.json's base_model_name_or_path, or --base when the base has moved) is loaded, grown to
the adapter's vocabulary when fine-tuning added tokens, and the adapter merged into it, so decoding runs at
the base's speed; the tokenizer is the one saved beside the adapter, or the base's when there is none (PEFT
saves adapters without one).
"""

from __future__ import annotations

import argparse
import sys

import torch

from ttl_core.cli import add_model_options, given_path, load_causal_lm, model_tokenizer_dir, refuse_ignored, run_cli
from ttl_core.errors import GenerationError, TokenizerError
from ttl_core.finetune import check_tokenizer_fits
from ttl_core.generate import generate
from ttl_core.streamer import TextStreamer
from ttl_core.model import LlamaForCausalLM
from ttl_core.sampling import special_token_ids
from ttl_core.chat_format import AIRA_END, chat_prompt
from ttl_core.tokenizer import Tokenizer

SAMPLING = {"temperature": 0.2, "top_k": 20, "top_p": 0.2, "min_p": 0.0}  # the model card's, as transformers names them


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    parser.add_argument("--tokenizer", type=given_path, help="tokenizer directory (default: the model directory)")
    parser.add_argument("--prompt", help="text to continue (in chat mode: the first question)")
    parser.add_argument("--input", default="",
                        help="extra context for --prompt, in the --chat format (Alpaca's `### Entrada:`)")
    parser.add_argument("--chat", choices=("aira", "alpaca"), help="wrap prompts in this chat format")
    parser.add_argument("--interactive", action="store_true", help="keep a conversation going from stdin")
    parser.add_argument("--max-new-tokens", type=int, default=150, help="new tokens per answer (default %(default)s)")
    parser.add_argument("--temperature", type=float, help=f"default {SAMPLING['temperature']}")
    parser.add_argument("--top-k", type=int, help=f"0 turns it off (default {SAMPLING['top_k']})")
    parser.add_argument("--top-p", type=float, help=f"1 turns it off (default {SAMPLING['top_p']})")
    parser.add_argument("--min-p", type=float, help=f"0 turns it off (default {SAMPLING['min_p']})")
    parser.add_argument("--repetition-penalty", type=float, default=1.2, help="1 turns it off (default %(default)s)")
    parser.add_argument("--greedy", action="store_true",
                        help="greedy decoding (no sampling options or --seed; the repetition penalty applies)")
    parser.add_argument("--seed", type=int, help="seed for reproducible sampling")
    parser.add_argument("--no-cuda-graph", action="store_true", help="decode without CUDA graphs")
    parser.add_argument("--assistant", type=given_path,
                        help="a smaller checkpoint with the same tokenizer that drafts tokens for "
                             "--model to verify (assisted decoding: TeenyTinyLlama-160m for -460m)")
    args = parser.parse_args(argv)
    if args.prompt is None and not args.interactive:
        parser.error("--prompt is required unless --interactive")
    if args.input and (args.chat is None or args.prompt is None):
        parser.error("--input adds context to --prompt in a --chat format; it needs both")
    refuse_ignored(parser, args, "--greedy", "--temperature", "--top-k", "--top-p", "--min-p", "--seed")
    if args.temperature == 0:  # how other tools ask for greedy decoding; the sampler would refuse it unexplained
        parser.error("--temperature 0 does not sample; use --greedy for greedy decoding")
    for name, value in SAMPLING.items():  # None until here, so that an option given is told from its default
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


class Chat:
    """The token ids of a conversation (or a plain text continuation) in one chat format. An answer ends at the
    tokenizer's EOS, at the checkpoint's EOS ids (`checkpoint_eos`, which transformers' generate() stops at too)
    and at the format's end token (`end`, which closes an answer that ran out of tokens)."""

    def __init__(self, tokenizer: Tokenizer, fmt: str | None, checkpoint_eos: list[int] = ()):
        self.tokenizer, self.fmt = tokenizer, fmt
        self.ids: list[int] = []
        self.end = tokenizer.eos_id
        if fmt == "aira":
            self.end = tokenizer.token_to_id(AIRA_END)
            if self.end is None:
                raise GenerationError(f"--chat aira needs a tokenizer with Aira's special tokens; {AIRA_END} is "
                                      "missing (a model fine-tuned with finetune_instruct.py --format aira has them; "
                                      "for another, try --chat alpaca)")
        self.eos = list(dict.fromkeys([tokenizer.eos_id, *checkpoint_eos, self.end]))

    def add_user(self, text: str, extra_input: str = "") -> None:
        """Append a user turn (or, without a format, plain text to continue)."""
        prompt = chat_prompt(self.fmt, text, extra_input) if self.fmt else text
        # `<s>` (if the tokenizer adds it) opens the conversation, as it opens every example in fine-tuning
        # (ttl_core.instruct)
        self.ids += self.tokenizer.encode(prompt, add_bos=self.tokenizer.add_bos_token and not self.ids, add_eos=False)

    def add_model(self, ids: list[int]) -> None:
        """Append the model's answer, closed with the end token unless it ends with an EOS id (it ran out of
        tokens, or stopped at a stop string)."""
        self.ids += ids
        if self.fmt and (not ids or ids[-1] not in self.eos):
            self.ids.append(self.end)


def reply(model: LlamaForCausalLM, chat: Chat, args: argparse.Namespace, streamer: TextStreamer, budget: int,
          assistant: LlamaForCausalLM | None = None) -> list[int]:
    """Generate (and stream) the model's continuation of the conversation, drafted by `assistant` if given;
    returns its token ids."""
    device = model.lm_head.weight.device
    ids = torch.tensor([chat.ids], dtype=torch.long, device=device)  # an empty prompt is still an id tensor
    # do_sample=False, not unset: a checkpoint's generation_config.json would otherwise decide
    sampling = dict(do_sample=False) if args.greedy else dict(
        do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        seed=args.seed)
    pad = chat.tokenizer.pad_id
    # one answer, streamed, as tokens, whatever num_return_sequences, num_beams or return_dict_in_generate a
    # generation_config.json gives; the tokenizer reads its stop_strings.
    # The mask: one row has no padding, so a padding id in it (a typed "<pad>") is a token, not padding to infer
    out = generate(model, ids, torch.ones_like(ids), max_new_tokens=budget, repetition_penalty=args.repetition_penalty,
                   eos_token_id=chat.eos, pad_token_id=pad if pad >= 0 else None,  # -1: no <pad> piece
                   num_return_sequences=1, num_beams=1, return_dict_in_generate=False, streamer=streamer,
                   tokenizer=chat.tokenizer, cuda_graph=not args.no_cuda_graph, **sampling,
                   **({"assistant_model": assistant} if assistant is not None else {}))
    print(flush=True)
    return out[0, ids.shape[1]:].tolist()


def converse(model: LlamaForCausalLM, chat: Chat, args: argparse.Namespace, streamer: TextStreamer,
             assistant: LlamaForCausalLM | None) -> None:
    """The interactive session: --prompt (if given) as the first turn, then a line of stdin a turn, each answered,
    until an empty line, the end of stdin or a full context."""
    context = model.config.max_position_embeddings
    first = args.prompt
    while True:
        if first is not None:
            print(f"> {first}")
            chat.add_user(first, args.input)
            first = None
        else:
            print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line.strip():
                return
            try:
                chat.add_user(line.rstrip("\r\n"))  # a file of turns from Windows ends its lines in \r\n
            except TokenizerError as e:  # a line the tokenizer refuses (a byte that is not UTF-8) ends no session
                print(f"error: {e}; type the line again", file=sys.stderr)
                continue
        room = context - len(chat.ids)
        if room < 1:
            print(f"The context is full ({context} tokens): the conversation ends here. Start a new one to go on.")
            return
        chat.add_model(reply(model, chat, args, streamer, min(args.max_new_tokens, room), assistant))


def main(argv: list[str] | None = None) -> int:
    """Answer --prompt once, or hold an interactive session (--interactive), streaming each answer."""
    args = parse_args(argv)
    model = load_causal_lm(args, "generation", GenerationError)
    assistant = None if args.assistant is None else load_causal_lm(
        argparse.Namespace(**{**vars(args), "model": args.assistant, "base": None}), "drafting", GenerationError)
    tokenizer_dir = args.tokenizer or model_tokenizer_dir(args.model, args.base)
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    check_tokenizer_fits(tokenizer, model.config, tokenizer_dir)  # another model's would misname ids
    context = model.config.max_position_embeddings
    chat = Chat(tokenizer, args.chat, special_token_ids(model, None, None)[0])
    streamer = TextStreamer(tokenizer, on_text=lambda piece: print(piece, end="", flush=True))

    if not args.interactive:
        chat.add_user(args.prompt, args.input)
        room = context - len(chat.ids)
        if room < 1:
            raise GenerationError(f"the context is full ({context} tokens): the prompt takes {len(chat.ids)}, which "
                                  f"leaves no room for an answer")
        reply(model, chat, args, streamer, min(args.max_new_tokens, room), assistant)
    else:
        converse(model, chat, args, streamer, assistant)
    return 0


if __name__ == "__main__":
    run_cli(main)
