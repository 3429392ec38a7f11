"""Run configs: the shipped recipes, `--set` overrides, and every refused setting named in one line."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import ROOT
from train_helpers import run_config
from ttl_core.errors import ConfigError
from ttl_core.recorded_config import check_resumable, resumed_model_settings
from ttl_core.run_config import load_run_config


def test_shipped_configs_load_and_match_the_published_recipe():
    ttl = load_run_config(ROOT / "configs" / "ttl-160m.toml")
    t = ttl.train
    assert (t.seq_len, t.lr, t.warmup_steps, t.weight_decay, t.betas, t.eps, t.dtype) == \
        (2048, 6e-4, 5000, 0.01, [0.9, 0.999], 1e-8, "bfloat16")
    assert t.tokens_per_step == 8192 and ttl.model_config().hidden_size == 768
    big = load_run_config(ROOT / "configs" / "ttl-460m.toml")
    assert (big.train.lr, big.train.warmup_steps, big.model_config().num_hidden_layers) == (3e-4, 10000, 24)
    for recipe, max_steps in ((t, 458_000), (big.train, 1_200_000)):
        # the published pretraining script's transformers "cosine" schedule decays to 0; no clipping; every
        # parameter decayed
        assert (recipe.max_steps, recipe.min_lr, recipe.grad_clip, recipe.no_decay) == (max_steps, 0.0, 0.0, [])
        assert (recipe.tokens_per_step, recipe.betas, recipe.eps, recipe.weight_decay, recipe.dtype, recipe.tf32) == \
            (8192, [0.9, 0.999], 1e-8, 0.01, "bfloat16", True)  # bf16 + tf32, as published
    tiny = load_run_config(ROOT / "configs" / "tiny.toml", ["train.grad_accum_steps=2", "train.lr=1e-3"])
    assert tiny.train.grad_accum_steps == 2 and tiny.train.lr == 1e-3 and not tiny.train.tf32


@pytest.mark.parametrize("override, message", [
    ("train.grad_acum_steps=2", "unknown key(s) in [train]: grad_acum_steps"),
    ("trian.lr=1", "unknown section 'trian'"),
    ("train.lr=fast", "train.lr must be a number"),
    ("model.hiden_size=8", "hiden_size"),
    ("train.dtype=\"float8\"", "train.dtype must be one of"),
    ("train.lr", "--set expects section.key=value"),
    # Python's spellings are no TOML: the value stays a string, and the error says how to write it
    ("train.lr=.5", "train.lr must be a number, got the string '.5' (values are read as TOML: 0.5,"),
    ("train.tf32=True", "train.tf32 must be true or false, got the string 'True' (values are read as TOML"),
    ("train.max_steps=1e3", "train.max_steps must be an integer, got 1000.0 (a float in TOML: write 1000)"),
    # a key given in the wrong section is named with the one it belongs to
    ("model.seq_len=128", "unknown key(s) in [model]: seq_len (preset or a LlamaConfig field); seq_len is a [train] "
                          "setting"),
    ("train.vocab_size=1024", "; vocab_size is a [model] setting"),
    ("data.seq_len=64", "; seq_len is a [train] setting"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError) as e:
        load_run_config(ROOT / "configs" / "tiny.toml", [override])
    assert message in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("train.weight_decay=nan", "weight_decay must be >= 0"), ("train.grad_clip=nan", "grad_clip must be >= 0"),
    ("train.eps=0.0", "eps must be > 0"), ("train.betas=[2.0, 0.9]", "betas must be two numbers"),
    ("train.no_decay=[1]", "no_decay must list"), ("train.seed=-1", "seed must be in"),
    ("train.lr=inf", "lr must be finite"), ("train.eps=inf", "eps must be finite"),
    ("train.weight_decay=inf", "weight_decay must be finite"),
    ("train.min_lr=0.5", r"min_lr must lie in \[0, lr=0.003\]"),
    ("train.keep_checkpoints=0", "keep_checkpoints must be >= 1"), ("train.seed=4294967296", "seed must be in"),
    ("train.betas=[false, 0.9]", "betas must be two numbers"),  # a bool is no number, here as everywhere else
    pytest.param("train.lr=" + "9" * 400, "train.lr must be a number", id="an integer no float can hold"),
    pytest.param("train.max_steps=" + "9" * 5000, "train.max_steps must be an integer",
                 id="an integer Python won't read"),
    ("model.preset=[\"tiny\"]", "unknown preset"), ("model.preset={name = \"tiny\"}", "unknown preset"),
    ("train.min_lr=-0.1", r"min_lr must lie in \[0, lr"), ("train.betas=[0.9, 1.0]", "betas must be two numbers"),
    # a bad lr is named itself, not as the bound of min_lr's range
    ("train.lr=nan", "train.lr must be >= 0, got nan"), ("train.lr=-0.001", "train.lr must be >= 0, got -0.001"),
    ("train.save_every=0", "save_every must be >= 1"),  # a step % 0 mid-run otherwise
    ("train.eval_every=-1", r"train.eval_every must be >= 0 \(0: no evaluation\), got -1"),
    # each value must have its setting's type: a bool is no int, a number no bool, a string no list of fragments
    ("train.compile=1", "train.compile must be true or false"),
    ("train.max_steps=true", "train.max_steps must be an integer"),
    ("train.no_decay=\"norm\"", "train.no_decay must be a list"),
    # every count that sizes a step, the schedule or evaluation, and the way processes share the model
    *[(f"train.{key}=0", f"train.{key} must be >= 1, got 0") for key in (
        "micro_batch_size", "grad_accum_steps", "seq_len", "max_steps", "eval_batches")],
    ("train.warmup_steps=-1", "train.warmup_steps must be >= 0"),
    ("train.sample_tokens=-1", "train.sample_tokens must be >= 0"),
    ("train.distributed=\"zero\"", "train.distributed must be one of ddp, fsdp, got 'zero'"),
])
def test_nan_and_out_of_range_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        run_config(override)


def test_a_config_that_is_not_text_or_not_tables_is_refused(tmp_path):
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "scalar.toml").write_text("model = 5\n")
    (tmp_path / "long.toml").write_text("[train]\nseed = " + "9" * 5000 + "\n")
    (tmp_path / "typo.toml").write_text("[trian]\nlr = 0.5\n")  # a misspelt section must not train with defaults
    (tmp_path / "loose.toml").write_text("max_steps = 5\n[train]\nlr = 0.5\n")  # a key above every header
    for path, message in ((tmp_path / "binary.toml", "invalid TOML"), (tmp_path / "scalar.toml", "must be a"),
                          (tmp_path / "typo.toml", r"unknown section\(s\) trian in .*typo.toml"),
                          (tmp_path / "loose.toml", r"loose.toml: max_steps is set outside any section; put it "
                                                    r"under \[model\], \[data\] or \[train\]"),
                          (tmp_path / "long.toml", "invalid TOML"),
                          (tmp_path, "cannot read the config")):
        with pytest.raises(ConfigError, match=message):
            load_run_config(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_a_config_error_not_a_torch_traceback():
    from ttl_core.distributed import init_world
    with pytest.raises(ConfigError, match="--device cuda was requested but no CUDA device is available"):
        init_world("cuda")


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, r"WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT are not set: launch .* with torchrun"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, r"WORLD_SIZE=2 but MASTER_ADDR, MASTER_PORT are not set"),
    ({"WORLD_SIZE": "two"}, r"WORLD_SIZE='two' must be an integer"),
    ({"WORLD_SIZE": "0"}, r"WORLD_SIZE=0 must be >= 1"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, r"RANK=2 is outside \[0, 2\)"),
])
def test_a_launch_environment_torchrun_did_not_set_is_a_config_error(monkeypatch, env, message):
    """Variables left over from another launcher (WORLD_SIZE alone, say) were a KeyError or torch's rendezvous
    ValueError; the checks run before any process group is joined."""
    from ttl_core.distributed import init_world
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # a check missed would wait to join a group whose peers never come, hanging the suite rather than failing it
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *args, **kwargs: pytest.fail("joined"))
    with pytest.raises(ConfigError, match=message):
        init_world("cpu")


def test_more_processes_per_node_than_gpus_is_a_config_error(monkeypatch):
    from ttl_core.distributed import init_world
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=1 needs CUDA device 1, but this machine has 1: start at most "
                                          r"1 process per node \(torchrun --nproc_per_node 1\)"):
        init_world("cuda")


def test_collectives_use_the_gpu_under_nccl_and_the_cpu_under_gloo():
    """NCCL reduces only CUDA tensors, and a CPU run's gloo group CPU ones: the loss and the eval totals go there."""
    from ttl_core.distributed import World
    assert World(1, 2, torch.device("cuda", 1)).reduce_device == torch.device("cuda", 1)
    assert World(1, 2, torch.device("cpu")).reduce_device == torch.device("cpu")


def test_integers_are_accepted_for_float_settings():
    t = load_run_config(None, ["train.lr=1", "train.min_lr=0", "train.weight_decay=0", "train.grad_clip=2"]).train
    assert (t.lr, t.min_lr, t.weight_decay, t.grad_clip) == (1.0, 0.0, 0.0, 2.0)
    assert all(isinstance(v, float) for v in (t.lr, t.min_lr, t.weight_decay, t.grad_clip))
    assert load_run_config(None, ["train.lr=3e-4", "train.min_lr=3e-4"]).train.min_lr == 3e-4  # a constant lr


def test_only_model_keys_given_by_set_count_as_model_overrides():
    """--init-from checks each of run.model_overrides against its checkpoint: a [data] or [train] key there would
    be looked up as a LlamaConfig field."""
    run = load_run_config(None, ["data.document_masking=true", "train.lr=1e-3", "model.attention_dropout=0.1"])
    assert run.model_overrides == ["attention_dropout"]


def test_a_resume_records_the_run_s_model_under_the_settings_it_gives():
    """What a resume gives (a runtime field such as attention) wins over what its run recorded; the rest is kept."""
    resume = load_run_config(None, ["model.attention=\"eager\""])
    saved = {"model": {"num_hidden_layers": 2, "attention": "sdpa"}}
    assert resumed_model_settings(resume, saved) == {"num_hidden_layers": 2, "attention": "eager"}


def test_an_unknown_model_key_is_named_with_or_without_a_preset(tmp_path):
    """Without a preset the [model] table goes straight to LlamaConfig, whose TypeError was a traceback."""
    (tmp_path / "typo.toml").write_text("[model]\nhidden_size = 64\nnum_layers = 2\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) in \[model\]: num_layers"):
        load_run_config(tmp_path / "typo.toml")
    for overrides in (["model.hiden_size=8"], ["model.preset=\"tiny\"", "model.hiden_size=8"]):
        with pytest.raises(ConfigError, match=r"unknown key\(s\) in \[model\]: hiden_size"):
            load_run_config(None, overrides)


def test_a_resume_naming_another_preset_is_refused_though_it_sets_no_field_itself(tmp_path):
    """A preset stands for its fields: resuming a run trained as "tiny" with model.preset="ttl-160m" alone names
    another hidden_size, though no [model] key but the preset is given."""
    saved = {"model": {"preset": "tiny"}}
    check_resumable(load_run_config(None, ["model.preset=\"tiny\""]), saved, tmp_path)
    with pytest.raises(ConfigError, match=r"^model.hidden_size is 768 here, but .* was trained in a run with 256"):
        check_resumable(load_run_config(None, ["model.preset=\"ttl-160m\""]), saved, tmp_path)


def test_a_resume_may_change_how_the_model_computes_but_not_the_model(tmp_path):
    """kernels and attention pick implementations of the same model: a resume may switch them; a field of the model
    given beside them is still checked."""
    saved = {"model": {"preset": "tiny", "kernels": "torch", "attention": "sdpa"}}
    switched = ["model.preset=\"tiny\"", "model.kernels=\"triton\"", "model.attention=\"eager\""]
    check_resumable(load_run_config(None, switched), saved, tmp_path)
    with pytest.raises(ConfigError, match=r"^model.num_hidden_layers is 3 here, but .* was trained in a run with 4"):
        check_resumable(load_run_config(None, [*switched, "model.num_hidden_layers=3"]), saved, tmp_path)
