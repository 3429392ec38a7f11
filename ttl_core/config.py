"""Model configuration: one plain dataclass with Hugging Face field names, plus the published presets."""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from ttl_kernels.dispatch import BACKENDS

from .errors import ConfigError, is_integer, is_number

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "LlamaForSequenceClassification")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
KERNEL_CHOICES = BACKENDS  # what ttl_kernels' dispatch takes
ATTENTION_CHOICES = ("auto", "sdpa", "flash_attn", "triton", "eager")
# fields that pick how the model runs on this machine, not what it is: never read from or written to a checkpoint
RUNTIME_FIELDS = ("kernels", "attention")


# transformers' PretrainedConfig fields every model has, at what ttl's forward does: a dict by default, no attentions
# or hidden states unless asked per call, decoder-only, feed-forward in one chunk
TRANSFORMERS_GENERIC_FIELDS = {"return_dict": True, "output_attentions": False, "output_hidden_states": False,
                               "is_encoder_decoder": False, "chunk_size_feed_forward": 0}


@dataclass
class LlamaConfig:
    """Llama hyper-parameters under their Hugging Face names, plus two ttl-only runtime switches.

    `kernels` picks the implementation of RMSNorm, rotary, SwiGLU and cross-entropy ("auto": Triton on CUDA,
    PyTorch references elsewhere and for float64; the `TTL_KERNELS` environment variable overrides "auto").
    `attention` picks the attention backend ("auto": flash-attn where usable, else SDPA; the `TTL_ATTENTION`
    environment variable overrides "auto"). Neither is written to config.json.
    """

    vocab_size: int = 32000
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 3
    num_labels: int = 2
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    kernels: str = "auto"
    attention: str = "auto"
    model_type: ClassVar[str] = "llama"  # transformers' name, which programs branch on

    def __post_init__(self) -> None:
        _check_field_types(self)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:  # transformers refuses such a config.json, head_dim or not
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                              f"{self.num_attention_heads}")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")
        self.rope_scaling = _checked_rope_scaling(self.rope_scaling, self.max_position_embeddings)
        if self.kernels not in KERNEL_CHOICES:
            raise ConfigError(f"kernels must be one of {KERNEL_CHOICES}, got {self.kernels!r}")
        if self.attention not in ATTENTION_CHOICES:
            raise ConfigError(f"attention must be one of {ATTENTION_CHOICES}, got {self.attention!r}")
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)
        else:  # transformers' names, which inference code indexes (`config.id2label[logits.argmax().item()]`), and
            # as there they replace a label2id given alone
            self.id2label = {i: f"LABEL_{i}" for i in range(self.num_labels)}
            self.label2id = None
        if self.label2id is None:
            self.label2id = {v: k for k, v in self.id2label.items()}
        # a one-class cross-entropy is 0 whatever the logits (nothing would be learned), and transformers refuses
        # to load a config.json that asks for it
        if self.problem_type == "single_label_classification" and self.num_labels == 1:
            raise ConfigError("problem_type single_label_classification needs num_labels > 1; use num_labels 2 "
                              "for two classes, or problem_type regression for one output")

    @property
    def rope_type(self) -> str:
        return self.rope_scaling["rope_type"] if self.rope_scaling else "default"

    def replace(self, **changes: Any) -> "LlamaConfig":
        """A copy with some fields changed (validated again). The fields `__post_init__` derived keep their
        values: `num_key_value_heads` and `head_dim` do not follow a new head count or hidden size unless
        changed too."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown LlamaConfig field(s): {', '.join(sorted(unknown))}")
        # the label fields describe one head: changing one rebuilds the others from it, as transformers does,
        # instead of keeping names for a head of another size
        if "id2label" in changes:
            id2label = changes["id2label"]
            if "num_labels" in changes and id2label is not None and len(id2label) != changes["num_labels"]:
                raise ConfigError(f"num_labels {changes['num_labels']} does not match the {len(id2label)} "
                                  "names of id2label")
            changes.setdefault("label2id", None)
        elif "num_labels" in changes and changes["num_labels"] != self.num_labels:
            changes["id2label"] = None
            changes.setdefault("label2id", None)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "LlamaConfig":
        """A preset by name (`ttl-160m`, `ttl-460m`, `tiny`), with fields optionally overridden."""
        if not isinstance(name, str) or name not in PRESETS:  # a list or table would fail the lookup itself
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown LlamaConfig field(s): {', '.join(sorted(unknown))}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **changes: Any) -> "LlamaConfig":
        """The config of a checkpoint directory (transformers' config.json or ttl's own), with fields optionally
        changed, as transformers' `AutoConfig.from_pretrained(dir, num_hidden_layers=...)` reads it."""
        from .hf import read_model_config  # hf.py imports this module
        config = read_model_config(path)[0]
        return config.replace(**changes) if changes else config

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Read a transformers `config.json` dict (both the v4 `rope_theta`/`rope_scaling` keys and the
        v5 `rope_parameters` block). Non-Llama models, activations other than SiLU and unknown rope types
        raise `ConfigError` naming the offending value."""
        if not isinstance(hf, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise ConfigError(f"unsupported model_type {model_type!r}; ttl implements 'llama' only")
        if not isinstance(hf.get("architectures") or [], list):
            raise ConfigError(f"architectures must be a list of class names, got {hf['architectures']!r}")
        for arch in hf.get("architectures") or []:
            if arch not in SUPPORTED_ARCHITECTURES:
                raise ConfigError(
                    f"unsupported architecture {arch!r}; ttl supports {', '.join(SUPPORTED_ARCHITECTURES)}"
                )
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # transformers maps both names to the same SiLU
            raise ConfigError(f"unsupported activation hidden_act={act!r}; Llama uses 'silu'")
        # pretraining_tp (v4 split each projection into that many matmuls: the same math) is not read by
        # current transformers either, so it is accepted and ignored
        # As transformers does, a v4 `rope_scaling` block wins over `rope_parameters`, and `rope_theta` comes
        # from the chosen block, else from the top level (a null where it is written: transformers fails on it).
        rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"rope_scaling / rope_parameters must be a JSON object, got {rope!r}")
        rope = dict(rope)
        rope_theta = rope.pop("rope_theta") if "rope_theta" in rope else hf.get("rope_theta", 10000.0)
        if not is_number(rope_theta):
            raise ConfigError(f"rope_theta must be a number, got {rope_theta!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = rope if rope_type != "default" else None
        # transformers' rotary set-up moves a top-level partial_rotary_factor into a scaling block that has none
        # (refused there, as its model fails on it), and lets a top-level original_max_position_embeddings, null
        # included, win over a llama3 or yarn block's
        if rope_scaling is not None and "partial_rotary_factor" in hf:
            rope_scaling.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
        if rope_type in ("llama3", "yarn") and "original_max_position_embeddings" in hf:
            rope_scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        if hf.get("is_causal", True) is False:
            raise ConfigError("is_causal false (bidirectional attention) is not supported; ttl's Llama is causal")
        fields = {f.name for f in dataclasses.fields(cls)} - {*RUNTIME_FIELDS, "rope_theta", "rope_scaling"}
        # keys config.json leaves out take transformers' defaults, not ttl's presets; an explicit null stays
        # null (no EOS, no padding token), means the default where transformers reads it so, and is refused
        # where transformers refuses it (a null rms_norm_eps must not become some default eps)
        refused = [k for k, v in hf.items() if v is None and k in fields
                   and k not in NULLABLE_HF_FIELDS + NULL_MEANS_DEFAULT_HF_FIELDS]
        if refused:
            raise ConfigError(f"config.json sets {', '.join(refused)} to null; transformers refuses that too")
        kwargs = {**HF_LLAMA_DEFAULTS, **{k: v for k, v in hf.items() if k in fields}}
        # an explicit num_labels that disagrees with id2label wins in transformers, which names the labels anew
        if isinstance(hf.get("id2label"), dict) and is_integer(hf.get("num_labels")) \
                and hf["num_labels"] != len(hf["id2label"]):
            kwargs.update(id2label=None, label2id=None)
        kwargs = {k: v for k, v in kwargs.items() if v is not None or k in NULLABLE_HF_FIELDS}
        return cls(rope_theta=float(rope_theta), rope_scaling=rope_scaling, **kwargs)

    def to_hf_dict(self, architecture: str = "LlamaForCausalLM", dtype: str = "float32") -> dict[str, Any]:
        """A transformers `config.json` dict that both transformers v4 and v5 read."""
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"unsupported architecture {architecture!r}")
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope_parameters = {**self.rope_scaling, "rope_theta": self.rope_theta}
        out: dict[str, Any] = {
            "architectures": [architecture],
            "model_type": "llama",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "rope_parameters": rope_parameters,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": self.attention_dropout,
            "mlp_bias": self.mlp_bias,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "pretraining_tp": 1,
            "use_cache": True,
            "dtype": dtype,
            "torch_dtype": dtype,
        }
        if architecture == "LlamaForSequenceClassification":
            out["id2label"] = {str(k): v for k, v in self.id2label.items()}
            out["label2id"] = self.label2id
            if self.problem_type is not None:
                out["problem_type"] = self.problem_type
        return out

    def to_dict(self) -> dict[str, Any]:
        """The fields transformers' `config.to_dict()` gives that programs read: config.json's, with the label fields
        of any head (id2label keyed by int) and, as in a config transformers built itself, `architectures` and `dtype`
        None (the config knows neither the model's class nor its dtype), with transformers' generic fields at the
        values that hold for ttl's models (`return_dict` True, `output_attentions` False, ...). Not a copy of
        transformers' dict: it lacks `_name_or_path` and `transformers_version` and keeps `rope_theta`/`rope_scaling`
        beside `rope_parameters`; `LlamaConfig.from_hf_dict` reads it back."""
        out = self.to_hf_dict("LlamaForSequenceClassification")
        del out["torch_dtype"]
        return {**out, **TRANSFORMERS_GENERIC_FIELDS, "architectures": None, "dtype": None,
                "problem_type": self.problem_type, "id2label": {int(k): v for k, v in out["id2label"].items()}}


def _checked_rope_scaling(rope_scaling: dict[str, Any] | None,
                          max_position_embeddings: int) -> dict[str, Any] | None:
    """`rope_scaling` with its type under `rope_type` (also read from transformers' older `type` key) and the
    original_max_position_embeddings of llama3 and yarn defaulted; None for the default rotary. An unsupported
    type, a partial rotary factor, or a parameter of the type that is missing or out of range is refused."""
    if rope_scaling is None:
        return None
    rope_scaling = dict(rope_scaling)
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        why = " (its frequencies follow the longest sequence seen; docs/models.md)" if rope_type == "dynamic" else ""
        raise ConfigError(f"unsupported rope type {rope_type!r}; ttl supports {', '.join(SUPPORTED_ROPE_TYPES)}{why}")
    rope_scaling["rope_type"] = rope_type
    rope_scaling.pop("type", None)
    if rope_type in ("llama3", "yarn"):  # transformers' default: the model was pretrained at its full context
        rope_scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
    if rope_scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"partial_rotary_factor {rope_scaling['partial_rotary_factor']!r} is not supported; "
                          "Llama rotates the whole head")
    required = {"linear": ["factor"], "llama3": ["factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings"],
                "yarn": ["factor", "original_max_position_embeddings"]}.get(rope_type, [])
    missing = [k for k in required if k not in rope_scaling]
    if missing:
        raise ConfigError(f"rope_scaling of type {rope_type!r} lacks {', '.join(missing)}")
    # a null yarn factor, beta or attention_factor means transformers' default (the context ratio, 32, 1, mscale)
    nullable = ["factor", "beta_fast", "beta_slow", "attention_factor"] if rope_type == "yarn" else []
    for key in dict.fromkeys(required + nullable):
        if key in nullable and rope_scaling.get(key) is None:
            continue
        if not is_number(rope_scaling[key]) or not 0 < rope_scaling[key] < math.inf:
            raise ConfigError(f"rope_scaling {key} must be a positive finite number, got {rope_scaling[key]!r}")
    if rope_type == "yarn":
        _check_yarn(rope_scaling, max_position_embeddings)
    return None if rope_type == "default" else rope_scaling


YARN_KEYS = ("rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "attention_factor", "truncate", "partial_rotary_factor")


def yarn_factor(rope_scaling: dict[str, Any], max_position_embeddings: int) -> float:
    """YaRN's context extension: `factor`, or where it is null the ratio of the context to the pretraining one."""
    if rope_scaling["factor"] is not None:
        return rope_scaling["factor"]
    return max_position_embeddings / rope_scaling["original_max_position_embeddings"]


def _check_yarn(rope_scaling: dict[str, Any], max_position_embeddings: int) -> None:
    """What transformers computes garbage from (or reads otherwise than written) is refused; keys it ignores are
    kept, with a warning (Nous' YaRN Llama 2 configs carry a `finetuned` flag)."""
    factor = yarn_factor(rope_scaling, max_position_embeddings)
    if factor < 1:
        ratio = "" if rope_scaling["factor"] is not None else (
            f" (null: max_position_embeddings {max_position_embeddings} / original_max_position_embeddings "
            f"{rope_scaling['original_max_position_embeddings']})")
        raise ConfigError(f"rope_scaling factor of type 'yarn' must be >= 1, got {factor!r}{ratio}")
    if (rope_scaling.get("beta_fast") or 32) < (rope_scaling.get("beta_slow") or 1):
        raise ConfigError(f"rope_scaling beta_fast {rope_scaling.get('beta_fast')!r} is below beta_slow "
                          f"{rope_scaling.get('beta_slow')!r} (null: 32 and 1); the blend would run backwards")
    for key in ("mscale", "mscale_all_dim"):
        value = rope_scaling.get(key)
        if value is not None and (not is_number(value) or not 0 <= value < math.inf):
            raise ConfigError(f"rope_scaling {key} must be a finite number >= 0, got {value!r}")
    if not isinstance(rope_scaling.get("truncate", True), bool):  # transformers would read a null as false
        raise ConfigError(f"rope_scaling truncate must be true or false, got {rope_scaling['truncate']!r}")
    ignored = sorted(set(rope_scaling) - set(YARN_KEYS))
    if ignored:
        warnings.warn(f"rope_scaling keys {', '.join(ignored)} mean nothing to yarn rotary scaling; ignored")


def _is_token_id(value: Any) -> bool:
    # negative ids occur (old Llama configs have pad_token_id -1) and mean "none"
    return value is None or is_integer(value)


# Each field's type and range, checked before use: a config.json with "tie_word_embeddings": "false" (a truthy
# string), a zero head count or a negative eps must be refused by name, not turned into garbage or a traceback.
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings", "num_labels")
_OPTIONAL_POSITIVE_INTS = ("num_key_value_heads", "head_dim")
# a size past it overflows the kernels' int32 offsets (and torch's shapes, past 2**63), or builds without end
SIZE_LIMIT = 2**31
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")  # transformers' own
_POSITIVE_FLOATS = ("rms_norm_eps", "rope_theta")
_BOOLS = ("tie_word_embeddings", "attention_bias", "mlp_bias")


def _check_field_types(config: "LlamaConfig") -> None:
    for name in _POSITIVE_INTS + _OPTIONAL_POSITIVE_INTS:
        value = getattr(config, name)
        if value is None and name in _OPTIONAL_POSITIVE_INTS:
            continue
        if not is_integer(value) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if value >= SIZE_LIMIT:
            raise ConfigError(f"{name} must be below 2**31, got {value}")
    for name in _POSITIVE_FLOATS:
        value = getattr(config, name)
        if not is_number(value) or not 0 < value < math.inf:  # an infinite rope_theta or eps makes NaN activations
            raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
    for name in ("initializer_range", "attention_dropout"):
        if not is_number(getattr(config, name)) or not 0 <= getattr(config, name) < math.inf:
            raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(config, name)!r}")
    for name in _BOOLS:
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"{name} must be true or false, got {getattr(config, name)!r}")
    eos = config.eos_token_id
    for name, value in (("bos_token_id", config.bos_token_id), ("pad_token_id", config.pad_token_id),
                        *(("eos_token_id", e) for e in (eos if isinstance(eos, list) else [eos]))):
        if not _is_token_id(value):
            raise ConfigError(f"{name} must be a token id (an integer) or null, got {value!r}")
    if config.problem_type is not None and config.problem_type not in PROBLEM_TYPES:
        raise ConfigError(f"problem_type must be one of {', '.join(PROBLEM_TYPES)} or null, got "
                          f"{config.problem_type!r}")
    for name in ("rope_scaling", "id2label", "label2id"):
        if getattr(config, name) is not None and not isinstance(getattr(config, name), dict):
            raise ConfigError(f"{name} must be a JSON object or null, got {getattr(config, name)!r}")
    if config.id2label is not None and not all(str(k).lstrip("-").isdigit() for k in config.id2label):
        raise ConfigError(f"id2label keys must be integers, got {list(config.id2label)[:4]}")


# transformers' LlamaConfig defaults, for the keys a config.json may leave out
HF_LLAMA_DEFAULTS: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
    attention_dropout=0.0, mlp_bias=False, initializer_range=0.02, bos_token_id=1, eos_token_id=2,
    pad_token_id=None,
)
NULLABLE_HF_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "id2label", "label2id", "problem_type")
NULL_MEANS_DEFAULT_HF_FIELDS = ("num_key_value_heads", "head_dim", "attention_dropout")

_TTL_COMMON: dict[str, Any] = dict(
    vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3,
)

# Published TeenyTinyLlama shapes (the model cards on the Hugging Face Hub); `tiny` is sized for CPU training
# in minutes. None has GQA, and none names num_key_value_heads: it follows num_attention_heads, also where an
# override changes the head count.
PRESETS: dict[str, dict[str, Any]] = {
    "ttl-160m": dict(_TTL_COMMON, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12),
    "ttl-460m": dict(_TTL_COMMON, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                     num_attention_heads=16),
    "tiny": dict(_TTL_COMMON, vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=4, max_position_embeddings=512),
}


def padding_index(pad_token_id: int | None, vocab_size: int) -> int | None:
    """The embedding row of the pad token, read as transformers' `nn.Embedding(padding_idx=pad_token_id)` reads
    it: a negative id counts from the end (old Llama configs say -1), one past the vocabulary is an error."""
    if pad_token_id is None:
        return None
    if not -vocab_size <= pad_token_id < vocab_size:
        raise ConfigError(f"pad_token_id {pad_token_id} is outside the vocabulary of {vocab_size} tokens")
    return pad_token_id % vocab_size
