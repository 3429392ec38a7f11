"""Bad checkpoints, configs, adapters and arguments end in one clear error naming the problem, never in a
traceback or in silently wrong weights."""

from __future__ import annotations

import io
import json
import warnings

import pytest
import torch
from helpers import load_script, run_in_ascii_locale, run_script
from hf_reference import hf_causal_lm
from safetensors.torch import load_file, save_file

import ttl_kernels
from ttl_kernels.dispatch import BackendError
import ttl_core
from ttl_core.cli import run_cli
from ttl_core.errors import AdapterError, CheckpointError, ConfigError, GenerationError
from ttl_core.fileio import write_json
from ttl_core.lora import apply_lora, lora_layers
from ttl_core.lora_files import load_adapter, save_adapter


@pytest.fixture
def checkpoint(tmp_path):
    hf_causal_lm().save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
    ({"vocab_size": 131.0}, "vocab_size must be a positive integer"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be a positive finite number"),
    ({"rope_theta": 0, "rope_parameters": None}, "rope_theta must be a positive finite number"),
    ({"rope_theta": float("inf"), "rope_parameters": None}, "rope_theta must be a positive finite number, got inf"),
    ({"rope_scaling": {"type": "linear", "factor": 0}}, "factor must be a positive finite number"),
    ({"rope_scaling": {"type": "linear", "factor": float("inf")}}, "factor must be a positive finite number"),
    ({"initializer_range": float("inf")}, "initializer_range must be a finite number >= 0, got inf"),
    ({"architectures": "LlamaForCausalLM"}, "architectures must be a list"),
    ({"pad_token_id": "x"}, "pad_token_id must be a token id"),
    ({"attention_dropout": 1.0}, r"attention_dropout must be in \[0, 1\), got 1.0"),
    # transformers refuses it too; ttl trained on a loss that is always 0 and wrote a config.json it cannot load
    ({"problem_type": "single_label_classification", "id2label": {"0": "yes"}},
     "single_label_classification needs num_labels > 1"),
])
def test_wrongly_typed_or_ranged_config_values_are_named(checkpoint, changes, message):
    edit_config(checkpoint, **changes)
    with pytest.raises(ConfigError, match=message):
        ttl_core.load_pretrained(checkpoint)


def test_a_config_json_that_is_not_an_object_is_refused(checkpoint):
    (checkpoint / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        ttl_core.load_pretrained(checkpoint)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.float8_e4m3fn])
def test_tensors_of_a_non_float_dtype_are_refused(checkpoint, dtype):
    tensors = load_file(checkpoint / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight"
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"tensor {key} has dtype"):
        ttl_core.load_pretrained(checkpoint)


@pytest.mark.parametrize("device, message", [("bogus", "unknown device"), ("meta", "not 'meta'")]
                         + ([] if torch.cuda.is_available() else [("cuda", "no CUDA GPU"), (0, "unknown device 0")]))
def test_unusable_devices_are_refused(checkpoint, device, message):
    """GPU 0 given as torch takes it, the index 0, is no CPU: it loaded onto the CPU as if no device was given."""
    with pytest.raises(CheckpointError, match=message):
        ttl_core.load_pretrained(checkpoint, device=device)
    with pytest.raises(CheckpointError, match="not a floating-point weight dtype"):
        ttl_core.load_pretrained(checkpoint, dtype=torch.int64)


@pytest.mark.parametrize("problem, num_labels, labels, message", [
    ("single_label_classification", 3, [0.0, 2.0], r"one integer class id per sequence \(2\), got .* torch.float32"),
    ("single_label_classification", 3, [[0, 2], [1, 1]], r"class id per sequence \(2\), got shape \(2, 2\)"),
    ("regression", 2, [0.5, 1.5], r"regression takes a target per label, shape \(2, 2\), got \(2,\)"),  # broadcast
    ("regression", 1, [0.5, 1.5, 2.5], r"regression takes a target per sequence \(2\), got shape \(3,\)"),
    ("multi_label_classification", 3, [0.0, 1.0], r"takes a target per label, shape \(2, 3\), got \(2,\)"),
])
def test_classifier_labels_that_do_not_fit_the_problem_type_are_named(problem, num_labels, labels, message):
    """torch failed inside its loss naming neither the labels nor the problem type, or (regression over two labels)
    broadcast the targets against the wrong outputs with only a warning."""
    config = ttl_core.LlamaConfig.from_preset("tiny", hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                              vocab_size=50, num_labels=num_labels, problem_type=problem)
    ids = torch.randint(4, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match=message):
        ttl_core.LlamaForSequenceClassification(config)(ids, labels=torch.tensor(labels))


@pytest.mark.parametrize("ids", [[1.0, 5.7], torch.tensor([[5, 6]]), [[5, 6]], torch.tensor([1.0, 5.0]), 5])
def test_decode_takes_one_sequence_of_integer_ids(ids):
    """A float id was cut to a token (5.7 read as 5) without a word; a batch (what generate() returns) failed in
    torch's or int()'s words. Integer ids of any kind decode: a tensor's, an array's."""
    import numpy as np
    from tokenizer_helpers import corpus

    tok = ttl_core.train_tokenizer(corpus(50), None, vocab_size=300)
    with pytest.raises(ttl_core.TTLError, match=r"^decode takes one sequence of integer token ids \(a batch: "):
        tok.decode(ids)
    expected = tok.decode([5, 6, 70])
    assert tok.decode(torch.tensor([5, 6, 70], dtype=torch.int32)) == tok.decode(np.array([5, 6, 70])) == expected


def test_an_hf_export_over_a_native_one_loads(checkpoint, tmp_path):
    model = ttl_core.load_pretrained(checkpoint)
    ttl_core.save_native(model, tmp_path / "out")
    ttl_core.save_pretrained(model, tmp_path / "out")  # a stale ttl_config.json would take precedence
    reloaded = ttl_core.load_pretrained(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))


@pytest.mark.parametrize("size", [0, -5, "0GB", "0.4B", True])
def test_a_shard_size_of_no_bytes_is_refused(checkpoint, tmp_path, size):
    """Below one byte every tensor would be a shard of its own, silently (True is no byte count either)."""
    with pytest.raises(CheckpointError, match="max_shard_size must be (at least one byte|a byte count)"):
        ttl_core.save_pretrained(ttl_core.load_pretrained(checkpoint), tmp_path / "out", max_shard_size=size)
    assert not (tmp_path / "out").exists()


def test_saving_a_model_with_lora_adapters_as_a_plain_checkpoint_is_refused(checkpoint, tmp_path):
    """The HF layout has no place for the adapters: writing it would silently drop them."""
    model = apply_lora(ttl_core.load_pretrained(checkpoint), r=4)
    with pytest.raises(CheckpointError, match=r"cannot represent \(backbone\.layers\.0\.attn\.qkv\.lora.*unload_lora"):
        ttl_core.save_pretrained(model, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_nan_temperature_and_unusable_seeds_are_refused(checkpoint):
    model = ttl_core.load_pretrained(checkpoint)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(GenerationError, match="temperature"):
        ttl_core.generate(model, ids, max_new_tokens=2, do_sample=True, temperature=float("nan"))
    with pytest.raises(GenerationError, match="seed must be"):
        ttl_core.generate(model, ids, max_new_tokens=2, do_sample=True, seed=10**30)


@pytest.mark.parametrize("changes, message", [
    ({"use_rslora": "false"}, "use_rslora must be true or false"), ({"r": "abc"}, "rank r must be an integer"),
    ({"lora_dropout": 5}, "dropout must be in"), ({"target_modules": None}, "target_modules must be a string or a"),
    ({"layers_pattern": 0}, "layers_pattern must be a string or a list"), ({"modules_to_save": "x"}, "must be a list"),
])
def test_a_bad_adapter_config_is_named_and_leaves_the_model_untouched(checkpoint, tmp_path, changes, message):
    save_adapter(apply_lora(ttl_core.load_pretrained(checkpoint), r=4), tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    model = ttl_core.load_pretrained(checkpoint)
    with pytest.raises(AdapterError, match=message):
        load_adapter(model, tmp_path / "adapter")
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_an_adapter_that_does_not_fit_leaves_the_model_untouched(checkpoint, tmp_path):
    save_adapter(apply_lora(ttl_core.load_pretrained(checkpoint), r=4), tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    model = ttl_core.load_pretrained(checkpoint)
    with pytest.raises(AdapterError, match="has shape"):
        load_adapter(model, tmp_path / "adapter")
    assert not lora_layers(model)
    load_adapter(model, _restore_r(tmp_path / "adapter", config))  # and a retry with the right one works
    assert lora_layers(model)


@pytest.mark.parametrize("damage, message", [
    ("pickle", r"adapter_model.bin is a pickle, which ttl never unpickles \(it can run code\); re-save"),
    ("missing", r"holds no adapter_model.safetensors$"),
    ("truncated", r"adapter_model.safetensors: unreadable \("),
])
def test_an_adapter_without_readable_safetensors_is_one_clear_error(checkpoint, tmp_path, damage, message):
    """PEFT falls back to adapter_model.bin, a pickle: ttl names it and says why it is not read."""
    save_adapter(apply_lora(ttl_core.load_pretrained(checkpoint), r=4), tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-7])
    else:
        if damage == "pickle":
            torch.save(load_file(weights), tmp_path / "adapter" / "adapter_model.bin")
        weights.unlink()
    with pytest.raises(AdapterError, match=message):
        load_adapter(ttl_core.load_pretrained(checkpoint), tmp_path / "adapter")


def _restore_r(adapter, config):
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return adapter


def test_scripts_report_file_system_and_backend_errors_in_one_line(checkpoint, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    result = run_script("convert", "--to-hf", checkpoint, tmp_path / "a_file")
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda argv: ttl_kernels.rms_norm(torch.randn(2, 4), torch.ones(4), backend="bogus"))
    assert exit_.value.code == 2 and capsys.readouterr().err.startswith("error: kernel backend must be one of")


def test_a_file_system_error_names_the_path_given_not_its_temporary(tmp_path, capsys):
    """A directory where an output file goes (check_goals --json DIR): the rename of DIR.tmp over DIR fails,
    and the line names DIR, not the temporary, which no longer exists."""
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda argv: write_json(tmp_path / "out", {}))
    assert exit_.value.code == 2 and capsys.readouterr().err == f"error: {tmp_path / 'out'}: Is a directory\n"


@pytest.mark.parametrize("made", ["run", "run/.prepare", "run/a/b"])
def test_an_output_directory_that_is_a_file_is_named_as_such(tmp_path, capsys, made):
    """--out naming a file: mkdir's own words ("File exists") read as if the run had already been written there,
    and a directory made inside it (prepare_data's RUN/.prepare) named a path the user never gave."""
    (tmp_path / "run").write_text(f"{torch.rand(()).item()}\n")
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda argv: (tmp_path / made).mkdir(parents=True, exist_ok=True))
    assert exit_.value.code == 2 and capsys.readouterr().err == f"error: {tmp_path / 'run'}: a file, not a directory\n"


def test_a_directory_that_exists_already_keeps_mkdir_s_words(tmp_path, capsys):
    """Only a file in the path is "a file, not a directory": a directory made that exists already is not one."""
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda argv: (tmp_path / "run").mkdir())
    assert exit_.value.code == 2 and capsys.readouterr().err == f"error: {tmp_path / 'run'}: File exists\n"


def test_prepare_data_into_a_file_names_the_file(tmp_path, capsys):
    (tmp_path / "run").write_text("")
    with pytest.raises(SystemExit):
        run_cli(load_script("prepare_data").main, ["--sample", "--out", str(tmp_path / "run"), "--workers", "1"])
    assert capsys.readouterr().err == f"error: {tmp_path / 'run'}: a file, not a directory\n"


def test_scripts_exit_with_main_s_status_and_130_on_ctrl_c(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    for main, code in ((lambda argv: 3, 3), (lambda argv: None, 0), (interrupted, 130)):
        with pytest.raises(SystemExit) as exit_:
            run_cli(main, [])
        assert exit_.value.code == code
    assert capsys.readouterr().err == ""


def test_a_script_prints_text_its_locale_cannot_encode_escaped():
    """Under an ASCII locale, printing a generated answer or pretrain's closing sample ("O Brasil é ...") raised
    UnicodeEncodeError: a traceback and exit status 1 after the work was done; the text is now written with
    Python's escapes (as stderr already is) and the script exits with main's status."""
    code = ("from ttl_core.cli import run_cli; "
            "run_cli(lambda argv: print('sample: O Brasil \\xe9 \\u201cgrande\\u201d', flush=True))")
    run = run_in_ascii_locale(code)
    assert run.returncode == 0 and run.stdout == "sample: O Brasil \\xe9 \\u201cgrande\\u201d\n", run.stderr[-500:]


def test_scripts_show_ttl_s_warnings_in_one_line_and_a_library_s_as_python_does(capsys):
    def main(argv):
        warnings.warn("val.bin will be empty", UserWarning)
        warnings.warn("an argument a library will drop", FutureWarning)

    # Python's own display of a warning is what pytest records
    with pytest.warns(FutureWarning, match="an argument a library will drop"), pytest.raises(SystemExit):
        run_cli(main, [])
    assert capsys.readouterr().err == "warning: val.bin will be empty\n"

    def shown_into_a_file(argv):  # a caller that names the file: the line goes there, not to stderr
        warnings.showwarning("val.bin will be empty", UserWarning, "data.py", 1, file=shown)

    shown = io.StringIO()
    with pytest.raises(SystemExit):
        run_cli(shown_into_a_file, [])
    assert shown.getvalue() == "warning: val.bin will be empty\n" and capsys.readouterr().err == ""


def _kernel_calls(ints: torch.Tensor) -> dict:
    """Each public kernel called with one integer tensor where a floating one belongs."""
    floats = ints.float()
    angles = torch.randn(3, 64)
    heads = ints.view(1, 3, 2, 64)
    return {
        "rms_norm": lambda b: ttl_kernels.rms_norm(floats, torch.ones(64, dtype=torch.long), backend=b),
        "swiglu": lambda b: ttl_kernels.swiglu(ints, floats, backend=b),
        "apply_rotary": lambda b: ttl_kernels.apply_rotary(heads, heads, angles, angles, backend=b),
        "cross_entropy": lambda b: ttl_kernels.cross_entropy(ints, torch.tensor([0] * 6), backend=b),
        "fused_linear_cross_entropy": lambda b: ttl_kernels.fused_linear_cross_entropy(
            floats, ints, torch.tensor([0] * 6), backend=b),
        "flash_attention": lambda b: ttl_kernels.flash_attention(heads, heads, heads, backend=b),
    }


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("kernel", ["rms_norm", "swiglu", "apply_rotary", "cross_entropy", "fused_linear_cross_entropy",
                                    "flash_attention"])
def test_kernels_refuse_integer_tensors_by_name(kernel, backend):
    # the Triton path rounded its float results to the integer dtype (RMSNorm of 1..4 gave 0s and 1s); the
    # references raised deep inside torch, or rounded likewise
    ints = torch.randint(1, 5, (6, 64), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match=f"{kernel} takes floating-point tensors, got .* of dtype torch.int64"):
        _kernel_calls(ints)[kernel](backend)


def _float64_kernel_calls(backend: str, device: str = "cpu") -> dict:
    """Each public kernel called on float64 inputs with `backend`."""
    gen = torch.Generator().manual_seed(0)
    rows, heads, angles = (torch.randn(*shape, generator=gen, dtype=torch.float64).to(device)
                           for shape in ((6, 64), (1, 3, 4, 64), (3, 64)))
    targets, positions = torch.arange(6, device=device), torch.arange(3, device=device)
    return {
        "rms_norm": lambda: ttl_kernels.rms_norm(rows, rows[0], backend=backend),
        "swiglu": lambda: ttl_kernels.swiglu(rows, backend=backend),
        "apply_rotary": lambda: ttl_kernels.apply_rotary(heads, heads, angles, angles, backend=backend),
        "apply_rotary_qkv": lambda: ttl_kernels.apply_rotary_qkv(heads, angles, angles, 1, backend=backend),
        "rotary_into_cache": lambda: ttl_kernels.rotary_into_cache(
            heads, angles, angles, heads[:, :, :1].clone(), heads[:, :, :1].clone(), positions, backend=backend),
        "cross_entropy": lambda: ttl_kernels.cross_entropy(rows, targets, backend=backend),
        "fused_linear_cross_entropy": lambda: ttl_kernels.fused_linear_cross_entropy(rows, rows, targets,
                                                                                     backend=backend),
        "flash_attention": lambda: ttl_kernels.flash_attention(heads, heads, heads, backend=backend),
    }


FLOAT_KERNELS = ["rms_norm", "swiglu", "apply_rotary", "apply_rotary_qkv", "rotary_into_cache", "cross_entropy",
                 "fused_linear_cross_entropy", "flash_attention"]


@pytest.mark.parametrize("kernel", FLOAT_KERNELS)
def test_triton_kernels_refuse_float64_which_they_would_compute_in_float32(kernel):
    # the kernels compute in float32: float64 inputs came back as float64 results of float32 accuracy (1e-7 off
    # the reference), so a float64 gradcheck of a kernel failed as if its backward were wrong
    with pytest.raises(BackendError, match="compute in float32, so float64 .* backend='torch'"):
        _float64_kernel_calls("triton")[kernel]()


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", FLOAT_KERNELS)
def test_auto_gives_float64_cuda_inputs_to_the_reference(kernel):
    # on the CPU "auto" always takes the reference, so only a GPU shows that float64 CUDA tensors skip the float32
    # kernels: their results must be the reference's, bit for bit
    got, want = (_float64_kernel_calls(backend, "cuda")[kernel]() for backend in ("auto", "torch"))
    for g, w in zip(*(out if isinstance(out, tuple) else (out,) for out in (got, want)), strict=True):
        assert g.dtype == torch.float64 and torch.equal(g, w)


@pytest.mark.parametrize("float64_input", ["rms_norm weight", "rms_norm residual", "swiglu up",
                                           "fused_linear_cross_entropy weight"])
def test_triton_kernels_refuse_float64_in_any_floating_input(float64_input):
    # a float32 activation beside a float64 weight, residual or up half promotes to a float64 result, of float32
    # accuracy on the Triton path: the dispatch must look at every floating input, not the first alone
    gen = torch.Generator().manual_seed(0)
    rows, wide = torch.randn(6, 64, generator=gen), torch.randn(6, 64, generator=gen, dtype=torch.float64)
    calls = {
        "rms_norm weight": lambda: ttl_kernels.rms_norm(rows, wide[0], backend="triton"),
        "rms_norm residual": lambda: ttl_kernels.rms_norm(rows, rows[0], residual=wide, backend="triton"),
        "swiglu up": lambda: ttl_kernels.swiglu(rows, wide, backend="triton"),
        "fused_linear_cross_entropy weight": lambda: ttl_kernels.fused_linear_cross_entropy(
            rows, wide, torch.arange(6), backend="triton"),
    }
    with pytest.raises(BackendError, match="compute in float32, so float64 .* backend='torch'"):
        calls[float64_input]()


def test_kernel_dispatch_refuses_what_it_cannot_run_in_one_line(monkeypatch):
    # a misspelt TTL_KERNELS must not act as "triton" (every value but "torch" and "auto" would force it); a CPU
    # tensor without Triton's interpreter must not reach a launch; every non-floating dtype is refused, not int64 alone
    x = torch.randn(2, 8)
    monkeypatch.setenv("TTL_KERNELS", "cuda")
    with pytest.raises(BackendError, match="TTL_KERNELS must be one of .*, got 'cuda'"):
        ttl_kernels.rms_norm(x, torch.ones(8))
    monkeypatch.setenv("TTL_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendError, match="need triton and a CUDA tensor or TRITON_INTERPRET=1 .*got a cpu tensor"):
        ttl_kernels.rms_norm(x, torch.ones(8))
    for dtype in (torch.int32, torch.bool):
        with pytest.raises(TypeError, match=f"swiglu takes floating-point tensors, got gate of dtype {dtype}"):
            ttl_kernels.swiglu(x.to(dtype), backend="torch")


def test_flash_attention_names_cu_seqlens_given_as_a_list():
    q = torch.randn(5, 2, 64)
    with pytest.raises(TypeError, match="cu_seqlens must be an integer tensor, got a list"):
        ttl_kernels.flash_attention(q, q, q, cu_seqlens=[0, 2, 5], max_seqlen=3, backend="triton")


def test_float64_refused_under_ttl_kernels_triton_names_the_variable_not_auto(monkeypatch):
    # with TTL_KERNELS=triton, "auto" is what the call already passed: the message told the user to pass it
    monkeypatch.setenv("TTL_KERNELS", "triton")
    rows = torch.randn(6, 64, dtype=torch.float64)
    with pytest.raises(BackendError, match=r"compute in float32, .*TTL_KERNELS=triton forces them") as raised:
        ttl_kernels.swiglu(rows)
    assert "'auto'" not in str(raised.value)


def test_float64_model_with_triton_kernels_names_the_config_field():
    # a model's kernel calls pass config.kernels as `backend`, which its user never wrote
    config = ttl_core.LlamaConfig.from_preset("tiny", kernels="triton")
    model = ttl_core.build_model(config, "LlamaForCausalLM").double()
    with pytest.raises(BackendError, match=r"float64 .*kernels='torch'"):
        model(torch.tensor([[1, 2, 3]]))


def test_float64_model_with_triton_attention_names_the_attention_backend():
    # the kernels' float64 refusal told a model with attention="triton" to change backend= or kernels=, neither of
    # which picks its attention
    model = ttl_core.build_model(ttl_core.LlamaConfig.from_preset("tiny", attention="triton"), "LlamaForCausalLM")
    with pytest.raises(ConfigError, match=r"attention backend 'triton' computes in float32: .*'sdpa' or 'eager'"):
        model.double()(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("changes, message", [
    ({"grad_accum_steps": 0}, r"^grad_accum_steps \(--grad-accum-steps\) must be an integer >= 1, got 0$"),
    ({"grad_clip": -1.0}, r"^grad_clip \(--grad-clip\) must be a finite number >= 0 \(0: no clipping\), got -1.0$"),
    ({"grad_clip": float("inf")}, r"^grad_clip .*must be a finite number >= 0"),
    ({"lora_r": 0}, r"^lora_r \(--lora-r\) must be an integer in \[1, 2\*\*31\), got 0$"),
    ({"dtype": "float8"}, r"^dtype \(--dtype\) must be one of float32, bfloat16, float16, got 'float8'$"),
])
def test_fine_tuning_settings_out_of_range_are_refused_by_the_config_itself(changes, message):
    """FinetuneConfig is the library's entry point too: a setting the scripts' parser never lets through (a dtype
    outside its choices) is refused when the config is made, not mid-run."""
    from ttl_core.finetune import FinetuneConfig
    with pytest.raises(ConfigError, match=message):
        FinetuneConfig(**changes)


def test_integer_targets_for_a_multi_label_loss_are_named():
    """BCE takes one 0..1 float per label: integer targets failed deep in torch with a cast error ("result type
    Float can't be cast to ... Long") that named neither the labels nor the problem type."""
    config = ttl_core.LlamaConfig.from_preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=1, num_labels=3,
                                              problem_type="multi_label_classification")
    model = ttl_core.build_model(config, "LlamaForSequenceClassification")
    gen = torch.Generator().manual_seed(11)
    ids, labels = torch.randint(4, 64, (2, 7), generator=gen), torch.randint(0, 2, (2, 3), generator=gen)
    with pytest.raises(ConfigError, match=r"multi_label_classification takes float targets .*got torch.int64"):
        model(ids, labels=labels)
    assert model(ids, labels=labels.float()).loss.isfinite()
