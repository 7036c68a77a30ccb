"""Model families as adapters: each family's size axis, defaults and step; hf: language models end to end."""
import json
import subprocess
import sys

import pytest
import torch

from orchestrator import engine, families, fleet, job, simulated, spec, summary
from orchestrator.answers import lookup
from orchestrator.errors import NoAnswer, SpecError
from orchestrator.spec import Workload

TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 1000, "n_positions": 256}
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "max_position_embeddings": 256}
TINY_BERT = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 128, "vocab_size": 1000, "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    out = {}
    wide = dict(TINY_GPT2, vocab_size=50257)  # GPT-2's vocabulary: its logits, not max_batch, bound the batch
    for name, cfg in (("gpt2", TINY_GPT2), ("llama", TINY_LLAMA), ("bert", TINY_BERT), ("wide", wide)):
        (root / f"{name}.json").write_text(json.dumps(cfg))
        out[name] = f"hf:{root / name}.json"
    return out


def test_every_family_is_sized_by_a_declared_axis(monkeypatch):
    spec._check_declarations()
    assert {families.family_of(m).size for m in ("torchvision:resnet18", "timm:x", "ultralytics:yolov8n.yaml",
                                                 "my_pkg.models:build")} == {"imgsz"}
    assert families.family_of("hf:gpt2").size == "seq_len"
    monkeypatch.setitem(families.FAMILIES, "graphs", families.Family("graphs", "nodes", "x:y", "graphs:g"))
    with pytest.raises(TypeError, match="'graphs' is sized by 'nodes', which is not a size axis"):
        spec._check_declarations()


def test_a_workload_has_its_familys_size_and_no_other():
    lm = spec.make(model="hf:gpt2", seq_len=512)
    assert (lm.imgsz, lm.seq_len, lm.size, lm.size_axis) == (0, 512, 512, "seq_len")
    image = spec.make(model="torchvision:resnet18", imgsz=224)
    assert (image.imgsz, image.seq_len, image.size) == (224, 0, 224)
    with pytest.raises(SpecError, match=r"^imgsz=320 does not size hf:gpt2: its samples are sized by seq_len; "
                                        r"give seq_len instead$"):
        spec.make(model="hf:gpt2", imgsz=320)
    with pytest.raises(SpecError, match="seq_len=128 does not size torchvision:resnet18"):
        Workload(model="torchvision:resnet18", seq_len=128)
    with pytest.raises(SpecError, match="^imgsz=640 does not size hf:gpt2"):  # given, even at its default
        spec.make(model="hf:gpt2", imgsz=640)
    assert spec.make(model="hf:gpt2", imgsz=None).imgsz == 0  # None: not given
    assert Workload(model="torchvision:resnet18", objects=100).objects == 100  # tables before families kept it
    assert Workload(**lm.as_dict()) == lm  # a row read back from a table (imgsz 0) is the same workload
    assert lm.label() == "hf:gpt2@seq_len=512 bf16 AdamW no checkpointing lora_rank 0 all-linear sdpa"


def test_family_defaults_apply_where_a_field_is_not_given():
    lm = spec.make(model="hf:gpt2")
    assert (lm.precision, lm.optimizer, lm.ema, lm.nbs, lm.val_scale) == ("bf16", "AdamW", False, 1, 0)
    assert spec.make(model="hf:gpt2", optimizer="SGD", nbs=8).optimizer == "SGD"
    yolo = spec.make(model="ultralytics:yolov8n.yaml")
    assert (yolo.precision, yolo.optimizer, yolo.ema, yolo.nbs, yolo.val_scale) == ("fp16", "SGD", True, 64, 2)


def test_grid_sizes_each_model_on_its_own_axis():
    j = job.from_dict({"sweep": {"grid": [{"models": ["tiny_models:tiny", "hf:gpt2"], "imgsz": [32],
                                           "seq_len": [128, 256]}]}})
    got = [(w.model, w.imgsz, w.seq_len, w.optimizer) for w in j.sweep.workloads()]
    assert got == [("tiny_models:tiny", 32, 0, "SGD"), ("hf:gpt2", 0, 128, "AdamW"), ("hf:gpt2", 0, 256, "AdamW")]
    with pytest.raises(SpecError, match=r"#1 seq_len sizes none of its models \(tiny_models:tiny\)"):
        job.from_dict({"sweep": {"grid": [{"models": ["tiny_models:tiny"], "seq_len": [128]}]}}, "j.toml")
    flagged = job.with_overrides(j, seq_len=[64])
    assert sorted(w.seq_len for w in flagged.sweep.workloads() if w.model == "hf:gpt2") == [64]
    with pytest.raises(SpecError, match="--seq-len: no model of <dict> is sized by seq_len"):
        job.with_overrides(job.from_dict({"sweep": {"models": ["tiny_models:tiny"]}}), seq_len=[64])


@pytest.mark.parametrize("name,precision,batch,levers", [
    ("gpt2", "fp32", 1, {}), ("gpt2", "bf16", 4, {}), ("llama", "bf16", 3, {}), ("bert", "fp32", 4, {}),
    ("llama", "bf16", 2, {"checkpointing": True}), ("gpt2", "fp32", 2, {"lora_rank": 4}),
    ("llama", "bf16", 2, {"lora_rank": 4, "checkpointing": True}), ("gpt2", "bf16", 2, {"attention": "eager"}),
    ("llama", "bf16-pure", 2, {}), ("gpt2", "bf16-pure", 2, {"lora_rank": 4})])
def test_hf_step_traces_the_tensors_of_a_real_cpu_run(configs, name, precision, batch, levers):
    """The simulated step's tensor peak against a real CPU run of the same step (built on meta for the
    fake trace, with real weights for the real one), with each lever."""
    w = spec.make(model=configs[name], seq_len=64, precision=precision, **levers)
    built = __import__("orchestrator.models", fromlist=["build"]).build(w)
    assert next(built.module.parameters()).is_meta
    fake = simulated.tensor_peak(simulated.trace(built, w, batch))
    real = simulated.tensor_peak(simulated.trace(built, w, batch, fake=False, surrogate=True))
    assert abs(fake / real - 1) <= 0.02, (fake, real)


def test_levers_cut_what_they_should_and_apply_to_language_models_only(configs):
    """Checkpointing drops the layers' activations, LoRA the base weights' gradients and optimizer state,
    eager attention keeps the weights that sdpa's fused kernels never hold: each moves the CUDA trace's peak."""
    peak = {}
    for name, levers in (("full", {}), ("checkpointing", {"checkpointing": True}), ("lora", {"lora_rank": 4}),
                         ("eager", {"attention": "eager"}), ("pure", {"precision": "bf16-pure"})):
        w = spec.make(model=configs["llama"], seq_len=256, **levers)
        built = __import__("orchestrator.models", fromlist=["build"]).build(w)
        peak[name] = simulated.tensor_peak(simulated.trace(built, w, 8, cuda_costs=True))
    assert peak["checkpointing"] < peak["full"] and peak["lora"] < peak["full"] < peak["eager"], peak
    assert peak["pure"] < peak["full"], peak  # 2-byte weights, gradients and optimizer state
    with pytest.raises(SpecError, match=r"^lora_rank=8 does not apply to torchvision:resnet18: only to hf models"):
        spec.make(model="torchvision:resnet18", lora_rank=8)
    with pytest.raises(SpecError, match=r"^precision='bf16-pure' builds the weights in bfloat16, which only hf"):
        spec.make(model="torchvision:resnet18", precision="bf16-pure")
    w = spec.make(model=configs["llama"], seq_len=64, lora_rank=4, lora_targets="q_proj, v_proj")
    adapted = {n.split(".")[-4] for n, p in __import__("orchestrator.models", fromlist=["build"]).build(w)
               .module.named_parameters() if p.requires_grad}  # ...q_proj.lora_A.default.weight
    assert adapted == {"q_proj", "v_proj"}
    with pytest.raises(SpecError, match=r"^lora_rank=4: peft cannot adapt hf:.*llama.json \(Target modules"):
        engine.autobatch(configs["llama"], seq_len=64, lora_rank=4, lora_targets="wq", gpu="T4")
    with pytest.raises(SpecError, match=r"lora_rank=4: peft cannot adapt"):  # a sweep: before any actor starts
        fleet.validate_models(job.from_dict({"sweep": {"models": [configs["llama"]], "seq_len": [64],
                                                       "lora_rank": 4, "lora_targets": "wq"}}).sweep)
    j = job.from_dict({"sweep": {"lora_rank": [0, 8], "models": ["tiny_models:tiny", "hf:gpt2"], "imgsz": [32],
                                 "seq_len": [64]}})
    assert sorted((w.model, w.lora_rank) for w in j.sweep.workloads()) == [
        ("hf:gpt2", 0), ("hf:gpt2", 8), ("tiny_models:tiny", 0)]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_fake_trace_attends_as_a_real_run_of_the_same_inputs(configs, name):
    """Fake tensors make transformers assume packed sequences and build a batch x 1 x seq x seq mask; a real
    run of our unpadded inputs has none, and the fake trace must not either: the peaks are equal to the byte."""
    w = spec.make(model=configs[name], seq_len=256, precision="fp32")
    built = __import__("orchestrator.models", fromlist=["build"]).build(w)
    fake = simulated.tensor_peak(simulated.trace(built, w, 4))
    real = simulated.tensor_peak(simulated.trace(built, w, 4, fake=False, surrogate=True))
    assert fake == real


def test_a_config_json_is_built_in_the_workloads_dtype_whatever_it_says(tmp_path):
    """Published configs say torch_dtype bfloat16; the weights' dtype is the workload's precision."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(TINY_LLAMA, torch_dtype="bfloat16")))
    build = __import__("orchestrator.models", fromlist=["build"]).build
    dtypes = {p: next(build(spec.make(model=f"hf:{path}", seq_len=64, precision=p)).module.parameters()).dtype
              for p in ("bf16", "bf16-pure")}
    assert dtypes == {"bf16": torch.float32, "bf16-pure": torch.bfloat16}
    path.write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(SpecError, match="its config has no model_type"):
        build(spec.make(model=f"hf:{path}", seq_len=64))


def test_hf_sizes_and_names_are_checked(configs):
    with pytest.raises(SpecError, match=r"seq_len=512 is longer than hf:.*gpt2.json's 256 positions: use at most 256"):
        engine.autobatch(configs["gpt2"], seq_len=512, gpu="T4")
    with pytest.raises(SpecError, match="is not a named architecture"):
        engine.autobatch("hf:no-such-model", seq_len=64, gpu="T4")
    with pytest.raises(SpecError, match="does not exist"):
        engine.autobatch("hf:/no/such/config.json", seq_len=64, gpu="T4")


def test_meta_built_model_costs_no_host_memory_and_answers_no_fit():
    """Llama 3.1 8B: 16 bytes per weight with AdamW (128 GB) fits no 80 GB card; built on meta in well
    under a second of host work per trace."""
    r = engine.autobatch("hf:llama-3.1-8b", seq_len=128, gpu="A100-80GB")
    assert r.decision.batch_size == 0 and r.decision.status == "no-fit"


def test_sweep_of_images_and_language_models_reads_back_by_seq_len(ray_session, configs, tmp_path):
    out = tmp_path / "table.csv"
    j = job.from_dict({"sweep": {"out": str(out), "grid": [
        {"models": ["tiny_models:tiny"], "imgsz": [32]},
        {"models": [configs["wide"]], "seq_len": [64, 128]}]},
        "fleet": {"mode": "simulate", "simulate": "T4, A10G"}})
    stats, df = fleet.run_sweep(j)
    assert len(df) == 6 and set(df["status"]) == {"ok"}
    lm = df[df["model"] == configs["wide"]]
    assert set(lm["imgsz"]) == {0} and set(lm["seq_len"]) == {64, 128}
    assert set(df[df["model"] == "tiny_models:tiny"]["seq_len"]) == {0}
    assert summary.pivot(df).index.names == ["model", "imgsz", "seq_len"]  # not ema, precision: family defaults
    row = lm[(lm["seq_len"] == 64) & (lm["card"] == "T4")].iloc[0]
    assert lookup(out, configs["wide"], seq_len=64, gpu="T4").batch_size == row["batch_size"]
    short = int(row["batch_size"])
    longer = int(lm[(lm["seq_len"] == 128) & (lm["card"] == "T4")].iloc[0]["batch_size"])
    assert longer < short < j.sweep.max_batch  # twice the tokens per sample: fewer samples
    done = subprocess.run([sys.executable, "-m", "orchestrator", "lookup", str(out), "--model", configs["wide"],
                           "--seq-len", "64", "--gpu", "T4"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(short)
    assert "@seq_len=64 bf16 AdamW no checkpointing" in done.stderr


def test_hf_trainer_arguments_from_the_table(ray_session, configs, tmp_path):
    """TrainingArguments' per-device batch and accumulation from rows swept with that accumulation."""
    from transformers import TrainingArguments

    from orchestrator.integrations.hf_trainer import table_arguments

    out = tmp_path / "t.csv"
    model = configs["wide"]
    j = job.from_dict({"sweep": {"out": str(out), "nbs": [1, 1000], "grid": [{"models": [model], "seq_len": [128]}]},
                       "fleet": {"mode": "simulate", "simulate": "T4"}})
    _, df = fleet.run_sweep(j)
    alone = int(df[df["nbs"] == 1].iloc[0]["batch_size"])
    accumulating = int(df[df["nbs"] == 1000].iloc[0]["batch_size"])
    assert table_arguments(out, model, 128, gpu="T4", world_size=1) == {"per_device_train_batch_size": alone}
    args = table_arguments(out, model, 128, gpu="T4", global_batch=1000, world_size=1)
    micro, steps = args["per_device_train_batch_size"], args["gradient_accumulation_steps"]
    assert micro <= accumulating and micro * steps == 1000 and steps <= 2 * -(-1000 // accumulating)
    ta = TrainingArguments(str(tmp_path / "run"), report_to=[], **args)
    assert ta.per_device_train_batch_size == micro and ta.gradient_accumulation_steps == steps
    with pytest.raises(NoAnswer, match="nbs"):  # rows swept without that accumulation do not answer it
        table_arguments(out, model, 128, gpu="T4", global_batch=500, world_size=1)
    with pytest.raises(SpecError, match="global_batch=0 must be an int >= world_size"):
        table_arguments(out, model, 128, gpu="T4", global_batch=0, world_size=1)
