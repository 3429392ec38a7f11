"""Instruction tuning of a causal LM on instruction/response pairs in the Aira or Alpaca-PTBR chat format.

Each example is the chat prompt followed by the response, encoded as one text (what the model reads at
inference is exactly the prompt's tokens, then its own). The loss covers the response only: labels are -100
over the prompt tokens (unless `train_on_inputs`) and over padding. Where the attention backend runs packed
sequences natively (flash-attn, or our Triton kernel), a batch is one row of its examples end to end, kept
apart by `cu_seqlens`, with no padding at all; elsewhere it is right-padded to its longest example. Aira's
special tokens are added to the tokenizer, and the embeddings resized, when the base model lacks them. LoRA
(r 8, alpha 16, dropout 0.05 on q/v, Alpaca-LoRA-PTBR's settings) saves a PEFT adapter, or the merged model on
request.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from .chat_format import AIRA_END, AIRA_SPECIAL_TOKENS, chat_prompt, chat_response, check_chat_format
from .config import LlamaConfig
from .errors import ConfigError, DataError
from .fileio import refuse_lone_surrogate, write_json
from .finetune import (FinetuneConfig, improves, pack_sequences, packs_batches, pad_sequences, read_base,
                       right_pad, save_finetuned, start_lora, start_run, to_device, train_epochs)
from .hf import load_pretrained
from .lora_targets import EMBEDDING_MODULES
from .metrics import read_metrics
from .model import LlamaForCausalLM
from .task_files import Row, read_task_file
from .tokenizer import Tokenizer
from .step import autocast

# Accepted field names, first match wins: Alpaca-PTBR uses instruction/input/output, Aira prompt/completion.
INSTRUCTION_FIELDS = ("instruction", "prompt")
RESPONSE_FIELDS = ("output", "response", "completion")
INPUT_FIELD = "input"
# Alpaca-LoRA-PTBR's settings: LoRA r 8 / alpha 16 / dropout 0.05 on q/v, prompts cut at 512 tokens
INSTRUCT_DEFAULTS = FinetuneConfig(lr=2e-4, batch_size=8, epochs=3, max_length=512, lora=True)


def _pick(record: dict[str, Any], names: tuple[str, ...], path: Path, number: int) -> str:
    for name in names:
        if isinstance(record.get(name), str):
            return refuse_lone_surrogate(path, number, name, record[name])
    raise DataError(f"{path}:{number}: no text field among {', '.join(names)} (fields: {', '.join(map(repr, record))})")


def instruction_rows(path: str | Path) -> list[tuple[int, str, str, str]]:
    """(line, instruction, input, response) for each record of a JSON-lines file, a `.json` array of objects
    (Alpaca-PTBR's layout) or a CSV/TSV file."""
    path = Path(path)
    rows: list[Row] = read_task_file(path)
    out = []
    for number, record in rows:
        instruction = _pick(record, INSTRUCTION_FIELDS, path, number)
        response = _pick(record, RESPONSE_FIELDS, path, number)
        # null or missing: no input; any other non-text (0 and false included) is refused, not read as no input
        extra = "" if record.get(INPUT_FIELD) is None else record[INPUT_FIELD]
        if not isinstance(extra, str):
            raise DataError(f"{path}:{number}: field {INPUT_FIELD!r} must be text")
        refuse_lone_surrogate(path, number, INPUT_FIELD, extra)
        if not instruction.strip() or not response.strip():
            raise DataError(f"{path}:{number}: empty instruction or response")
        out.append((number, instruction, extra, response))
    return out


def add_chat_tokens(tokenizer: Tokenizer, chat_format: str) -> list[str]:
    """Make sure the format's special tokens exist: add the missing ones to the tokenizer and return them (the
    model's embeddings and LM head grow to fit them when it is loaded: `finetune_instruct`)."""
    check_chat_format(chat_format)
    wanted = list(AIRA_SPECIAL_TOKENS) if chat_format == "aira" else []
    missing = [tok for tok in wanted if tokenizer.token_to_id(tok) is None]
    if missing:
        tokenizer.add_special_tokens(missing)
    return missing


def stop_at_end_of_completion(model: LlamaForCausalLM, tokenizer: Tokenizer) -> None:
    """Aira answers end with `<|endofcompletion|>`, never with `</s>`: add it to the EOS ids of the
    generation_config.json a full or merged checkpoint is saved with, so transformers' `generate()` stops
    there too (a PEFT adapter carries no generation config; scripts/generate.py --chat aira stops there)."""
    settings = dict(model.generation_config or {})
    eos = settings.get("eos_token_id", model.config.eos_token_id)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    end = tokenizer.token_to_id(AIRA_END)
    settings["eos_token_id"] = eos + ([end] if end not in eos else [])
    model.generation_config = settings


def encode_chat(tokenizer: Tokenizer, chat_format: str, instruction: str, input: str, response: str,
                max_length: int, train_on_inputs: bool = False) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example, truncated to `max_length`. The prompt and response are encoded
    as one text, `<s>` first if the tokenizer adds it (Alpaca then appends EOS; Aira's response ends in
    `<|endofcompletion|>`); labels copy the ids except over the prompt's tokens, which are -100 unless
    `train_on_inputs`. Should BPE merge across the prompt/response boundary, only the tokens wholly inside the
    prompt are masked."""
    prompt = chat_prompt(chat_format, instruction, input)
    ids = tokenizer.encode(prompt + chat_response(chat_format, response), add_eos=False)
    if chat_format == "alpaca":
        ids.append(tokenizer.eos_id)
    prompt_ids = tokenizer.encode(prompt, add_eos=False)
    n_prompt = 0
    while n_prompt < min(len(ids), len(prompt_ids)) and ids[n_prompt] == prompt_ids[n_prompt]:
        n_prompt += 1
    labels = list(ids) if train_on_inputs else [-100] * n_prompt + ids[n_prompt:]
    return ids[:max_length], labels[:max_length]


def collate_lm(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """A batch right-padded to its longest example (`pad_sequences`), with its labels padded with -100."""
    return {**pad_sequences([ids for ids, _ in examples], pad_id),
            "labels": right_pad([labels for _, labels in examples], -100)}


def pack_lm(examples: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
    """`collate_lm`'s batch packed into one row (`pack_sequences`), with labels (1, total tokens) alongside. Each
    example's first label becomes -100: the model shifts labels by one token along the row, and the last token of
    an example must not learn to predict the next one's first token. No target is lost, since nothing predicts a
    first label in a padded batch either; the loss and `target_tokens` are those of `collate_lm`'s batch."""
    labels = torch.tensor([[label for _, lab in examples for label in [-100, *lab[1:]]]])
    return {**pack_sequences([ids for ids, _ in examples]), "labels": labels}


def lm_collator(model: LlamaForCausalLM, dtype: str, pad_id: int) -> Callable[[list], dict[str, Any]]:
    """How LM fine-tuning batches examples for `model` computing in `dtype`: `pack_lm` where `packs_batches`,
    else `collate_lm`. The batches of either form are keyword arguments of `model`."""
    if packs_batches(model, dtype):
        return pack_lm
    return lambda examples: collate_lm(examples, pad_id)


def build_instruction_data(path: str | Path, tokenizer: Tokenizer, chat_format: str, max_length: int,
                           train_on_inputs: bool = False,
                           rows: list[tuple[int, str, str, str]] | None = None) -> list[tuple[list[int], list[int]]]:
    """Encoded examples of an instruction file (its `instruction_rows`, when already read); an example whose
    response was cut off entirely by `max_length` has nothing to learn from and is an error naming its line."""
    out = []
    for number, instruction, extra, response in rows if rows is not None else instruction_rows(path):
        ids, labels = encode_chat(tokenizer, chat_format, instruction, extra, response, max_length, train_on_inputs)
        if all(label == -100 for label in labels[1:]):
            raise DataError(f"{path}:{number}: the prompt fills max_length {max_length}; no response token is "
                            "left to train on (raise --max-length or shorten the example)")
        out.append((ids, labels))
    return out


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The tokens a causal-LM batch's loss averages over (padded or packed): labels other than -100 after the
    one-token shift."""
    return int((batch["labels"][:, 1:] != -100).sum())


@torch.no_grad()
def lm_eval_loss(model: LlamaForCausalLM, examples: list, batch_size: int, pad_id: int,
                 device: torch.device, dtype: str = "float32") -> float:
    """Mean loss per response token over `examples`, under training's autocast `dtype`, in the batches
    `lm_collator` forms."""
    was_training = model.training
    model.eval()
    collate = lm_collator(model, dtype, pad_id)
    total = count = 0.0
    for start in range(0, len(examples), batch_size):
        batch = to_device(collate(examples[start:start + batch_size]), device)
        with autocast(device, dtype):
            out = model(**batch, loss_reduction="sum")
        total += out.loss.item()
        count += target_tokens(batch)
    model.train(was_training)
    return total / max(count, 1)


def _padding_id(config: LlamaConfig, tokenizer: Tokenizer, model_dir: str | Path) -> int:
    """The id instruction batches pad with: the config's pad id, else the tokenizer's pad or EOS id. Padded positions
    are masked out of attention and loss, so any token id serves when none is defined as padding."""
    pad_id = next((i for i in (config.pad_token_id, tokenizer.pad_id, tokenizer.eos_id) if i is not None and i >= 0),
                  None)
    if pad_id is None:
        raise ConfigError(f"{model_dir}: neither the config nor the tokenizer defines a pad or EOS token to pad with")
    return pad_id


def _load_for_chat(model_dir: str | Path, tokenizer: Tokenizer, chat_format: str, cfg: FinetuneConfig,
                   added: list[str]) -> LlamaForCausalLM:
    """The causal LM in `model_dir` ready to instruction-tune: float32 on `cfg`'s device, its embeddings grown by
    the `added` chat tokens, told to stop where `chat_format` ends a completion, and with `cfg`'s LoRA adapters."""
    model = load_pretrained(model_dir, dtype=torch.float32, device=cfg.torch_device())
    torch.manual_seed(cfg.seed)  # LoRA's A matrices and dropout masks
    if tokenizer.vocab_size > model.config.vocab_size:  # by the `added` tokens alone: read_base refused more
        model.resize_token_embeddings(tokenizer.vocab_size)
    if chat_format == "aira":
        stop_at_end_of_completion(model, tokenizer)
    if cfg.lora:
        # new embedding rows are trained (and saved) in full, as PEFT's modules_to_save
        start_lora(model, cfg, modules_to_save=list(EMBEDDING_MODULES) if added else None)
    return model


def finetune_instruct(model_dir: str | Path, data_file: str | Path, out_dir: str | Path, chat_format: str = "aira",
                      cfg: FinetuneConfig | None = None, eval_file: str | Path | None = None,
                      train_on_inputs: bool = False, verbose: bool = True) -> dict[str, Any]:
    """Instruction-tune the causal LM in `model_dir` on `data_file`; the kept model goes to OUT/best (the
    lowest eval loss when `eval_file` is given, else the last epoch) as a PEFT adapter with `cfg.lora`
    (plus the tokenizer, and the resized embeddings as modules_to_save) or as a full checkpoint.
    Returns the summary also written to OUT/results.json."""
    cfg = cfg or INSTRUCT_DEFAULTS
    out_dir = Path(out_dir)
    device = cfg.torch_device()
    # the data is read and checked first: a bad file fails at once, not after a model load of seconds
    train_rows = instruction_rows(data_file)
    eval_rows = instruction_rows(eval_file) if eval_file else None
    # then what needs only the tokenizer and config.json (prompts that fill max_length), before the weights load
    tokenizer, config, architecture = read_base(model_dir, cfg)
    if architecture != "LlamaForCausalLM":
        raise ConfigError(f"{model_dir} holds a {architecture}; instruction tuning needs a LlamaForCausalLM")
    added = add_chat_tokens(tokenizer, chat_format)
    pad_id = _padding_id(config, tokenizer, model_dir)
    train_examples = build_instruction_data(data_file, tokenizer, chat_format, cfg.max_length, train_on_inputs,
                                            train_rows)
    eval_examples = (build_instruction_data(eval_file, tokenizer, chat_format, cfg.max_length, train_on_inputs,
                                            eval_rows) if eval_file else None)
    model = _load_for_chat(model_dir, tokenizer, chat_format, cfg, added)
    log = start_run(out_dir, model_dir, cfg)
    history: list[dict[str, float]] = []
    best: dict[str, float] = {}

    def after_epoch(epoch: int, step: int) -> None:
        record: dict[str, float] = {"epoch": epoch}
        if eval_examples:
            record["eval_loss"] = lm_eval_loss(model, eval_examples, cfg.batch_size * 2, pad_id, device, cfg.dtype)
            log.log({"step": step, **record})
        history.append(record)
        improved = not eval_examples or improves(record["eval_loss"], best.get("eval_loss"), higher_is_better=False)
        if improved:
            best.clear()
            best.update(record)
            save_finetuned(model, out_dir / "best", tokenizer, cfg, model_dir)
        if verbose:
            shown = f", eval loss {record['eval_loss']:.4f}" if eval_examples else ""
            print(f"epoch {epoch}{shown}{' (saved)' if improved else ''}")

    collate = lm_collator(model, cfg.dtype, pad_id)
    try:
        train_epochs(model, train_examples, cfg, collate, target_tokens, log, after_epoch)
    finally:
        log.close()
    summary = {"data": str(data_file), "format": chat_format, "added_tokens": added,
               "train_examples": len(train_examples), "train_on_inputs": train_on_inputs,
               "packed": collate is pack_lm,
               "final_loss": [r["loss"] for r in read_metrics(out_dir / "metrics.jsonl") if "loss" in r][-1],
               "best": best, "history": history, "config": asdict(cfg)}
    write_json(out_dir / "results.json", summary)
    return summary
