"""Training: TOML config, a tiny run end to end, resume, DDP, fine-tuning, model export and loading."""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from AirwaySegmentationLib import volume
from AirwaySegmentationLib.cli import EXIT_BAD_INPUT, EXIT_INTERRUPTED, main
from AirwaySegmentationLib.data import phantom_seeds, phantom_training_volume
from AirwaySegmentationLib.errors import AirwayInputError
from AirwaySegmentationLib.infer import (
    cpu_has_native_bfloat16,
    predict_volume,
    resolve_precision,
)
from AirwaySegmentationLib.catalogue import catalogue, default_model_name
from AirwaySegmentationLib.models import (
    export_model,
    load_model,
    sha256_of_file,
)
from AirwaySegmentationLib.networks import SegmentationOutput, build_network
from AirwaySegmentationLib.preprocess import DEFAULT_INPUT_SPEC
from AirwaySegmentationLib.progress import Cancelled
from AirwaySegmentationLib.train import Runtime, SegmentationTask, TrainingLoss, load_training_volumes, train
from AirwaySegmentationLib.tree import parse_airway_tree
from AirwaySegmentationLib.train_config import (
    LossConfig,
    ScheduleConfig,
    config_from_dict,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "Resources" / "Training").glob("*.toml"))

#: Two small phantoms to train on and one to validate on, 32^3 patches, a 2-voxel-wide WingsNet.
TINY = {
    "seed": 3,
    "network": {"name": "wingsnet", "kwargs": {"base_width": 2}},
    "data": {"phantoms": {"train": 2, "validation": 1, "shape_zyx": [48, 64, 64], "spacing_zyx": [2.5, 2.0, 2.0]}},
    "sampling": {"patch_size_zyx": [32, 32, 32], "hard_mining_every": 1},
    "schedule": {"epochs": 2, "iterations_per_epoch": 2, "local_imbalance_from": 1, "centerline_from": 3},
    "validation": {"overlap_zyx": [8, 8, 8]},
    "runtime": {"precision": "float32"},
}


def tiny(**changes: dict) -> dict:
    """``TINY`` with some tables updated."""
    table = copy.deepcopy(TINY)
    for name, values in changes.items():
        if isinstance(values, dict):
            table.setdefault(name, {}).update(values)
        else:
            table[name] = values
    return table


def write_toml(table: dict, path: Path) -> Path:
    """A minimal TOML writer for the nested tables of a config (tomllib only reads)."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v)

    lines = [f"{k} = {value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for name, section in table.items():
        if isinstance(section, dict):
            lines.append(f"[{name}]")
            lines += [f"{k} = {value(v)}" for k, v in section.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def model_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("run")
    return out, train(config_from_dict(TINY), out)


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_load(path: Path) -> None:
    config = load_config(path)
    # Tang's 128^3 crops for stage 1, DeepTree's 64^3 patches for the connection network.
    expected = (64, 64, 64) if config.task == "connection" else (128, 128, 128)
    assert config.data.phantoms.validation > 0 and config.sampling.patch_size_zyx == expected


@pytest.mark.parametrize("name", ["wingsnet_phantom", "unet_connection_phantom"])
def test_a_bundled_fine_tuned_model_names_a_committed_init_with_its_checksum(name: str) -> None:
    """A fine-tuned round starts from the previous one: the card's command must be reproducible from the repository."""
    card = json.loads((ROOT / "Resources" / "Models" / f"{name}.json").read_text())
    init = card["init"]
    assert f"--init {init['file']}" in card["training"]["command"]
    _, init_card = load_model(ROOT / init["file"])  # refuses a file whose SHA-256 differs from its card
    assert init_card["sha256"] == init["sha256"]
    assert init_card["architecture"] == card["architecture"]


class EverythingIsAirway(torch.nn.Module):
    """Class 1 everywhere: the degenerate network an untrained model can start as."""

    def forward(self, x: torch.Tensor) -> SegmentationOutput:
        logits = torch.zeros(x.shape[0], 4, *x.shape[2:], dtype=x.dtype, device=x.device)
        logits[:, 1] = 10.0
        return SegmentationOutput(main=logits)


def test_a_network_labelling_everything_airway_is_never_the_best_model() -> None:
    config = config_from_dict(TINY)
    task = SegmentationTask()
    volume = phantom_training_volume(phantom_seeds("validation", 1)[0], "standard", (48, 64, 64), (2.5, 2.0, 2.0))
    task.validation_volumes = [volume]
    task.trees = [parse_airway_tree(volume.labels3 > 0, volume.spacing_zyx, connectivity=6)]
    metrics = task.validate(EverythingIsAirway(), config, DEFAULT_INPUT_SPEC, Runtime(torch.device("cpu"), torch.float32))
    assert metrics["td"] > 99.0 and metrics["precision"] < 10.0
    assert metrics["atm22_score"] > 45.0  # the mean of TD, BD, DSC and precision rewards it
    assert metrics["score"] == 0.0


def test_config_round_trips_through_toml(tmp_path) -> None:
    config = load_config(write_toml(TINY, tmp_path / "tiny.toml"))
    assert config == config_from_dict(TINY)
    assert config.network.kwargs == {"base_width": 2} and config.schedule.phase(0) == 1
    assert [config.schedule.phase(i) for i in range(4)] == [1, 2, 2, 3]


@pytest.mark.parametrize(
    "change, key",
    [
        ({"schedule": {"epoch": 3}}, "schedule.epoch"),
        ({"sampling": {"batch_size": "2"}}, "sampling.batch_size"),
        ({"sampling": {"patch_size_zyx": [32, 32]}}, "sampling.patch_size_zyx"),
        ({"schedule": {"epochs": 0}}, "schedule.epochs"),
        ({"schedule": {"local_imbalance_from": 5, "centerline_from": 2}}, "schedule.centerline_from"),
        ({"network": {"name": "unet9000"}}, "network.name"),
        ({"network": {"kwargs": {"base_widht": 2}}}, "network.kwargs"),
        ({"sampling": {"crop_mix": {"random": -1.0}}}, "sampling.crop_mix"),
        ({"loss": {"name": "mse"}}, "loss.name"),
        ({"runtime": {"precision": "int8"}}, "runtime.precision"),
        ({"data": {"phantoms": {"variants": ["glossy"]}}}, "data.phantoms.variants"),
        ({"validation": {"overlap_zyx": [32, 8, 8]}}, "validation.overlap_zyx"),
        ({"colour": "blue"}, "colour"),
        ({"seed": -1}, "seed"),
        ({"sampling": {"patch_size_zyx": [30, 30, 30]}}, "sampling.patch_size_zyx"),  # WingsNet: multiples of 8
        (
            {"network": {"name": "pwfr_unet", "kwargs": {"base_width": 2}}, "sampling": {"patch_size_zyx": [24, 24, 24]}},
            "sampling.patch_size_zyx",  # the U-Nets: multiples of 16
        ),
    ],
)
def test_bad_config_names_the_key(tmp_path, change: dict, key: str) -> None:
    path = write_toml(tiny(**change), tmp_path / "bad.toml")
    with pytest.raises(AirwayInputError, match=key.replace(".", r"\.").replace("[", r"\[")) as error:
        load_config(path)
    assert str(error.value).count("\n") == 0 and str(path) in str(error.value)


def test_unparsable_and_missing_configs_are_refused(tmp_path) -> None:
    (tmp_path / "broken.toml").write_text("[network\nname = 1\n")
    with pytest.raises(AirwayInputError, match="not valid TOML"):
        load_config(tmp_path / "broken.toml")
    with pytest.raises(AirwayInputError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_cli_train_with_a_bad_config_exits_2_with_one_sentence(tmp_path, capsys) -> None:
    path = write_toml(tiny(schedule={"iterations_per_epoch": -1}), tmp_path / "bad.toml")
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == EXIT_BAD_INPUT
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and "schedule.iterations_per_epoch" in message
    assert not (tmp_path / "run").exists()


def test_cli_train_interrupted_says_the_run_resumes(tmp_path, capsys, monkeypatch) -> None:
    def interrupted(*args, **kwargs):
        raise Cancelled("stopped")

    monkeypatch.setattr("AirwaySegmentationLib.train.train", interrupted)
    path = write_toml(TINY, tmp_path / "tiny.toml")
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == EXIT_INTERRUPTED
    message = capsys.readouterr().err
    assert "the last finished epoch is saved" in message and "resume" in message and "no partial output" not in message


def test_cli_train_with_a_diverging_loss_exits_2_with_one_sentence(tmp_path, capsys) -> None:
    table = tiny(optimizer={"lr": 1e30}, data={"phantoms": {**TINY["data"]["phantoms"], "train": 1, "validation": 0}})
    path = write_toml(table, tmp_path / "nan.toml")
    assert main(["train", str(path), "--out", str(tmp_path / "run")]) == EXIT_BAD_INPUT
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and "The loss is nan" in message and "optimizer.lr" in message


def test_precision_choice() -> None:
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32
    assert resolve_precision("auto", cpu) == expected
    assert resolve_precision("float32", cpu) == torch.float32
    with pytest.raises(AirwayInputError, match="needs a CUDA device"):
        resolve_precision("float16", cpu)


# ---------------------------------------------------------------- loss schedule


def test_loss_phases_add_the_weights_in_turn() -> None:
    torch.manual_seed(0)
    labels = torch.zeros(1, 16, 16, 16, dtype=torch.long)
    labels[0, 4:12, 6:10, 6:10] = 3
    batch = {"labels": labels, "centerline_weight": torch.rand(1, 16, 16, 16), "gul_weight": torch.rand(1, 16, 16, 16)}
    output = SegmentationOutput(torch.randn(1, 4, 16, 16, 16), aux=(torch.randn(1, 4, 16, 16, 16),))
    loss = TrainingLoss(LossConfig(name="tang"), ScheduleConfig(local_imbalance_from=10, centerline_from=20))

    def value(iteration: int, centerline_scale: float = 1.0) -> float:
        loss.reseed(0)
        scaled = {**batch, "centerline_weight": batch["centerline_weight"] * centerline_scale}
        return loss(output, scaled, iteration).main

    assert value(0) == value(0, centerline_scale=5.0)  # phase 1: plain Dice, no weight
    assert value(10) != value(0) and value(10) == value(10, centerline_scale=5.0)  # + w_p only
    assert value(20) != value(20, centerline_scale=5.0)  # + w_d
    terms = loss(output, batch, 0)
    assert terms.aux > 0 and float(terms.total) == pytest.approx(terms.main + terms.aux)
    without_aux = TrainingLoss(LossConfig(name="tang", group_supervision=False), ScheduleConfig())
    assert without_aux(output, batch, 0).aux == 0.0


@pytest.mark.parametrize("name", ["dice_ce", "dice_focal", "deeptree"])
def test_batch_dice_false_scores_each_sample_by_itself(name) -> None:
    torch.manual_seed(1)
    labels = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    labels[0, 2:6, 2:6, 2:6] = 1  # a large target
    labels[1, 4, 4, 4] = 1  # a one-voxel target
    batch = {"labels": labels, "gul_weight": torch.ones(2, 8, 8, 8)}
    output = SegmentationOutput(torch.randn(2, 4, 8, 8, 8))
    config = {"name": name, "group_supervision": False, "distillation_weight": 0.0}
    per_sample = TrainingLoss(LossConfig(**config, batch_dice=False), ScheduleConfig())
    whole_batch = TrainingLoss(LossConfig(**config), ScheduleConfig())
    assert per_sample(output, batch, 0).main > whole_batch(output, batch, 0).main


# ---------------------------------------------------------------- training runs


def test_tiny_run_writes_checkpoint_log_and_best_model(tiny_run) -> None:
    out, result = tiny_run
    for name in ("last.pt", "last.json", "log.csv", "best.safetensors", "best.json"):
        assert (out / name).is_file(), name
    rows = (out / "log.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,iteration,phase,loss") and len(rows) == 3
    assert result.epochs == 2 and result.iterations == 4 and np.isfinite(result.final_loss)
    assert 0.0 <= result.best_score <= 100.0 and result.best_epoch in (1, 2)
    card = json.loads((out / "best.json").read_text())
    assert card["sha256"] == sha256_of_file(out / "best.safetensors")
    assert card["architecture"] == {"name": "wingsnet", "kwargs": {"base_width": 2}}
    assert card["validation"]["score"] == pytest.approx(result.best_score)
    assert "2 training / 1 validation phantoms" in card["training"]["data"]
    model, _ = load_model(out / "best.safetensors")
    assert sum(p.numel() for p in model.parameters()) == card["parameter_count"]


def test_resume_after_a_kill_continues_and_repeats_the_uninterrupted_run(tmp_path) -> None:
    # Mining every 2 epochs and a kill in epoch 4: the resumed epoch must reuse the masks mined
    # in epoch 3, not mine new ones from the resumed model; all crops are hard-mining crops so
    # any other mask changes the patches.
    steps = 2  # per epoch: a model one epoch further on then mines other masks
    table = tiny(
        sampling={"hard_mining_every": 2, "crop_mix": {"random": 0.0, "hard_mining": 1.0, "small_airway": 0.0}},
        schedule={"epochs": 4, "iterations_per_epoch": steps},
        data={"phantoms": {**TINY["data"]["phantoms"], "validation": 0}},
        optimizer={"lr": 1e-2},
        runtime={"device": "cpu"},  # bitwise repeatable there (CUDA kernels are not)
    )
    train(config_from_dict(table), tmp_path / "uninterrupted")

    def cancel_in_epoch_4(fraction: float, message: str) -> None:
        if message.startswith("epoch 4/4"):
            raise Cancelled("killed")

    out = tmp_path / "resumed"
    with pytest.raises(Cancelled):
        train(config_from_dict(table), out, progress=cancel_in_epoch_4)
    saved = json.loads((out / "last.json").read_text())
    assert (saved["epoch"], saved["iteration"]) == (3, 3 * steps)
    assert len((out / "log.csv").read_text().splitlines()) == 4

    messages = []
    # A resumed run may load its volumes in other processes (same volumes, same run).
    parallel = {**table, "data": {**table["data"], "load_workers": 2}}
    result = train(config_from_dict(parallel), out, progress=lambda f, m: messages.append(m))
    assert not any(m.startswith("epoch 3/4") for m in messages)  # epoch 3 was not redone
    assert not any("hard mining" in m for m in messages)  # the saved masks were reused
    assert result.epochs == 4 and result.iterations == 4 * steps
    log = (out / "log.csv").read_text().splitlines()
    assert [row.split(",")[:2] for row in log[1:]] == [[str(i), str(i * steps)] for i in range(1, 5)]
    uninterrupted = model_state(tmp_path / "uninterrupted" / "last.pt")
    resumed = model_state(out / "last.pt")
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_loading_in_several_processes_gives_the_same_volumes_in_the_same_order() -> None:
    data = config_from_dict(tiny(data={"phantoms": {**TINY["data"]["phantoms"], "train": 3, "validation": 2}})).data
    serial = load_training_volumes(data)
    parallel = load_training_volumes(dataclasses.replace(data, load_workers=3))
    for one, other in zip(serial, parallel, strict=True):
        assert [v.name for v in one] == [v.name for v in other] and len(one) in (2, 3)
        for a, b in zip(one, other):
            assert np.array_equal(a.ct.array_zyx, b.ct.array_zyx) and np.array_equal(a.labels3, b.labels3)
            assert a.crop_box == b.crop_box


def test_a_kill_between_the_checkpoint_files_leaves_a_resumable_run(tmp_path, monkeypatch) -> None:
    table = tiny(schedule={"epochs": 2, "iterations_per_epoch": 1}, data={"phantoms": {**TINY["data"]["phantoms"], "validation": 0}})
    rename = os.replace
    renamed = []

    def kill_after_the_second_last_pt(source, target) -> None:
        rename(source, target)
        renamed.append(Path(target).name)
        if renamed.count("last.pt") == 2:
            raise KeyboardInterrupt("killed right after last.pt was renamed")

    monkeypatch.setattr(volume.os, "replace", kill_after_the_second_last_pt)
    with pytest.raises(KeyboardInterrupt):
        train(config_from_dict(table), tmp_path)
    monkeypatch.setattr(volume.os, "replace", rename)
    messages = []
    result = train(config_from_dict(table), tmp_path, progress=lambda f, m: messages.append(m))
    assert not any(m.startswith("epoch 2/2") for m in messages)  # last.pt had committed epoch 2
    assert (result.epochs, result.iterations) == (2, 2)
    assert json.loads((tmp_path / "last.json").read_text())["epoch"] == 2  # the copies were brought up to date
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 3
    # The best model comes after the commit point: the kill left it at epoch 1, the resume exported epoch 2.
    assert json.loads((tmp_path / "best.json").read_text())["training"]["epoch"] == 2


def test_extending_a_cosine_run_anneals_over_the_new_length(tmp_path) -> None:
    def config(epochs: int):
        return config_from_dict(tiny(
            optimizer={"lr_schedule": "cosine", "lr": 1e-3},
            sampling={"hard_mining_every": 0},
            schedule={"epochs": epochs, "iterations_per_epoch": 1},
            data={"phantoms": {**TINY["data"]["phantoms"], "train": 1, "validation": 0}},
        ))

    train(config(1), tmp_path)
    train(config(3), tmp_path)  # the run length may change on resume
    with open(tmp_path / "log.csv", newline="") as stream:
        lr = [float(row["lr"]) for row in csv.DictReader(stream)]
    # After epoch e of 3 (one iteration each) the next rate is lr * (1 + cos(pi e / 3)) / 2.
    assert lr[1:] == pytest.approx([1e-3 * (1 + np.cos(np.pi * e / 3)) / 2 for e in (2, 3)], abs=1e-6)


@pytest.mark.parametrize(
    "content",
    [
        {"model": argparse.Namespace(weights=1)},  # not tensors only: refused by weights_only
        {"model": {}, "optimizer": {}, "scaler": {}, "sidecar": json.dumps({"checkpoint_version": 2, "iteration": 0})},
        {"model": {}, "optimizer": {}, "scaler": {}, "sidecar": json.dumps(["not", "a", "table"])},
    ],
    ids=["pickled-object", "sidecar-without-keys", "sidecar-not-a-table"],
)
def test_an_unusable_checkpoint_exits_2_with_one_sentence(tmp_path, capsys, content: dict) -> None:
    out = tmp_path / "run"
    out.mkdir()
    # With an iteration and a last.json that agree, as the checkpoints of format 1 had: only the content is at fault.
    torch.save({**content, "iteration": torch.tensor(0)}, out / "last.pt")
    (out / "last.json").write_text(content.get("sidecar", "{}"))
    path = write_toml(TINY, tmp_path / "tiny.toml")
    assert main(["train", str(path), "--out", str(out)]) == EXIT_BAD_INPUT
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and "--no-resume" in message


def test_resume_refuses_another_config_and_no_resume_starts_over(tiny_run, tmp_path) -> None:
    out = tmp_path / "run"
    config = config_from_dict(tiny(schedule={"epochs": 1}, data={"phantoms": {**TINY["data"]["phantoms"], "validation": 0}}))
    train(config, out)
    other = config_from_dict(tiny(schedule={"epochs": 1}, optimizer={"lr": 1e-3}))
    with pytest.raises(AirwayInputError, match="another configuration"):
        train(other, out)
    result = train(other, out, resume=False)
    assert result.epochs == 1 and len((out / "log.csv").read_text().splitlines()) == 2
    # Starting over and killed in the first epoch: nothing of the discarded run is left to resume.

    def killed(fraction: float, message: str) -> None:
        if message.startswith("epoch 1/1"):
            raise Cancelled("killed")

    with pytest.raises(Cancelled):
        train(config, out, resume=False, progress=killed)
    assert not (out / "last.pt").exists()
    train(config, out)  # the original configuration: a fresh run, no "another configuration"


def test_init_fine_tunes_from_the_given_weights(tmp_path) -> None:
    torch.manual_seed(123)
    source = build_network("wingsnet", base_width=2)
    export_model(source, {"architecture": {"name": "wingsnet", "kwargs": {"base_width": 2}}}, tmp_path / "start")
    table = tiny(
        schedule={"epochs": 1, "iterations_per_epoch": 1},
        optimizer={"lr": 1e-9, "weight_decay": 0.0},
        data={"phantoms": {**TINY["data"]["phantoms"], "validation": 0}},
        runtime={"precision": "auto"},
    )
    result = train(config_from_dict(table), tmp_path / "run", init=tmp_path / "start.safetensors")
    tuned = model_state(tmp_path / "run" / "last.pt")
    # One AdamW step at lr 1e-9 moves each weight by about 1e-9: still the given weights.
    assert all(torch.allclose(tuned[k].float(), v.float(), atol=1e-6) for k, v in source.state_dict().items())
    assert np.isfinite(result.final_loss) and result.best_score is None  # no validation: the last model is kept
    assert (tmp_path / "run" / "best.safetensors").is_file()
    other = config_from_dict(tiny(network={"name": "wingsnet", "kwargs": {"base_width": 4}}))
    with pytest.raises(AirwayInputError, match="make \\[network\\] match"):
        train(other, tmp_path / "other", init=tmp_path / "start.safetensors")
    # The same weights spelled otherwise (a default written out, another dropout) fine-tune.
    respelled = tiny(schedule={"epochs": 1, "iterations_per_epoch": 1}, data=table["data"],
                     network={"name": "wingsnet", "kwargs": {"base_width": 2, "in_channels": 2, "dropout": 0.1}})
    train(config_from_dict(respelled), tmp_path / "respelled", init=tmp_path / "start.safetensors")


def test_ddp_two_processes_on_cpu(tmp_path) -> None:
    config = write_toml(tiny(data={"phantoms": {**TINY["data"]["phantoms"], "validation": 1}}), tmp_path / "ddp.toml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "--module", "AirwaySegmentationLib.cli", "train", str(config), "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert len(log) == 3 and (tmp_path / "run" / "best.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "last.json").read_text())["world_size"] == 2
    assert completed.stdout.count("best model") == 1  # only rank 0 reports


# ---------------------------------------------------------------- models


def test_export_load_round_trip_gives_identical_outputs(tmp_path) -> None:
    torch.manual_seed(0)
    net = build_network("pwfr_unet", base_width=2).eval()
    card = {"architecture": {"name": "pwfr_unet", "kwargs": {"base_width": 2}}, "patch_size_zyx": [32, 32, 32]}
    export_model(net, card, tmp_path / "model")
    loaded, loaded_card = load_model(tmp_path / "model.json")
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x).main, loaded(x).main)
    assert loaded_card["patch_size_zyx"] == [32, 32, 32] and "interpretation" in loaded_card["interpretation"].lower()
    assert loaded_card["parameter_count"] == sum(p.numel() for p in net.parameters())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]


def test_tampered_weights_are_refused(tmp_path) -> None:
    weights, _ = export_model(build_network("wingsnet", base_width=2), {"architecture": {"name": "wingsnet", "kwargs": {"base_width": 2}}}, tmp_path / "m")
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AirwayInputError, match="do not match the SHA-256") as error:
        load_model(weights)
    assert str(error.value).count(".") <= 3 and "\n" not in str(error.value)


def test_loading_never_unpickles(tmp_path, monkeypatch) -> None:
    net = build_network("wingsnet", base_width=2)
    disguised = tmp_path / "evil.safetensors"
    torch.save(net.state_dict(), disguised)  # a pickle under a safetensors name, with a matching card
    card = {"architecture": {"name": "wingsnet", "kwargs": {"base_width": 2}}, "sha256": sha256_of_file(disguised)}
    (tmp_path / "evil.json").write_text(json.dumps(card))

    def forbidden(*args, **kwargs):
        raise AssertionError("model loading must not unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with pytest.raises(AirwayInputError, match="not a safetensors file"):
        load_model(disguised)


def test_an_empty_catalogue_has_no_default_and_the_default_flag_wins(tmp_path) -> None:
    # No catalogue at all (a wheel install carries no Resources/Models) is said so, not "train one".
    with pytest.raises(AirwayInputError, match="This installation has no bundled models"):
        default_model_name(tmp_path)
    (tmp_path / "catalogue.json").write_text(json.dumps({"catalogue_version": 1, "models": []}))
    assert catalogue(tmp_path) == []
    with pytest.raises(AirwayInputError, match="no bundled segmentation model yet; train one with airway train"):
        default_model_name(tmp_path)
    export_model(build_network("wingsnet", base_width=2), {"architecture": {"name": "wingsnet", "kwargs": {"base_width": 2}}}, tmp_path / "w")
    entries = [{"name": "small", "file": "w.safetensors", "default": False}, {"name": "main", "file": "w.safetensors", "default": True}]
    (tmp_path / "catalogue.json").write_text(json.dumps({"catalogue_version": 1, "models": entries}))
    assert default_model_name(tmp_path) == "main"
    _, card = load_model("main", models_dir=tmp_path)
    assert card["architecture"]["name"] == "wingsnet"


def test_bundling_renames_the_weights_keeps_the_card_and_lists_one_default(tmp_path, monkeypatch) -> None:
    import AirwaySegmentationLib.models as models

    card = {"architecture": {"name": "wingsnet", "kwargs": {"base_width": 2}}, "training": {"command": "airway train x"}}
    run = tmp_path / "run"
    export_model(build_network("wingsnet", base_width=2), card, run / "best")
    shelf = tmp_path / "shelf"
    models.bundle_model(run / "best.safetensors", "first", "tiny", default=True, models_dir=shelf)
    weights = models.bundle_model(
        run / "best.json", "second", "tiny again", default=True, cpu_seconds=12.5,
        card_additions={"test_metrics": {"td": 91.0}}, models_dir=shelf,
    )
    entries = catalogue(shelf)
    assert [(e["name"], e["default"]) for e in entries] == [("first", False), ("second", True)]
    assert entries[1]["cpu_seconds"] == 12.5 and default_model_name(shelf) == "second"
    _, loaded = load_model("second", models_dir=shelf)
    assert loaded["weights_file"] == weights.name == "second.safetensors"
    assert loaded["sha256"] == sha256_of_file(weights)
    assert loaded["training"]["command"] == "airway train x" and loaded["test_metrics"] == {"td": 91.0}
    models.bundle_model(run / "best", "first", "replaced", models_dir=shelf)  # same name: replaced, not added
    assert [e["description"] for e in catalogue(shelf)] == ["tiny again", "replaced"]

    monkeypatch.setattr(models, "MAX_BUNDLED_BYTES", 1000)
    with pytest.raises(AirwayInputError, match="must stay under"):
        models.bundle_model(run / "best", "big", "too big", models_dir=shelf)
    assert not (shelf / "big.safetensors").exists() and "big" not in [e["name"] for e in catalogue(shelf)]


# ---------------------------------------------------------------- inference


@pytest.mark.parametrize("blending", ["gaussian", "mean"])
def test_predict_volume_keeps_the_shape_of_any_volume(blending: str) -> None:
    torch.manual_seed(0)
    net = build_network("wingsnet", base_width=2)
    for shape in [(37, 41, 29), (10, 20, 12)]:  # not divisible by the patch; smaller than the patch
        hu = np.random.default_rng(0).normal(-500, 300, shape).astype(np.float32)
        sums = predict_volume(net, hu, patch_size_zyx=(16, 16, 16), overlap_zyx=(4, 4, 4), blending=blending)
        probabilities = sums.probabilities()
        assert probabilities.shape == (4, *shape)
        np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)
        labels = sums.labels()
        assert labels.shape == shape and labels.dtype == np.uint8
        airway = 1.0 - probabilities[0] >= 0.5
        np.testing.assert_array_equal(labels > 0, airway)
        np.testing.assert_array_equal(labels[airway], np.argmax(probabilities[1:], axis=0)[airway] + 1)


def test_predict_volume_is_the_network_output_on_a_single_window() -> None:
    torch.manual_seed(0)
    net = build_network("wingsnet", base_width=2).eval()
    hu = np.random.default_rng(1).normal(-500, 300, (16, 16, 16)).astype(np.float32)
    from AirwaySegmentationLib.preprocess import network_input

    with torch.no_grad():
        direct = torch.softmax(net(torch.from_numpy(network_input(hu))[None]).main, dim=1)[0].numpy()
    np.testing.assert_allclose(predict_volume(net, hu, patch_size_zyx=(16, 16, 16), overlap_zyx=(0, 0, 0)).probabilities(), direct, atol=1e-6)


def test_exported_weights_get_ordinary_file_permissions(tmp_path) -> None:
    import os
    import stat

    previous = os.umask(0o022)
    try:
        weights, card = export_model(build_network("wingsnet", base_width=2), {"architecture": {"name": "wingsnet", "kwargs": {"base_width": 2}}}, tmp_path / "m")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(weights.stat().st_mode) == stat.S_IMODE(card.stat().st_mode) == 0o644


def test_the_bundled_models_load_and_match_their_catalogue() -> None:
    """Every catalogue entry loads (SHA-256 checked), stays under the size limit, and one per task is the default."""
    from AirwaySegmentationLib.models import MAX_BUNDLED_BYTES
    from AirwaySegmentationLib.catalogue import BUNDLED_MODELS_DIR

    entries = catalogue()
    for task in ("segmentation", "connection"):
        assert sum(bool(entry.get("default")) for entry in entries if entry["task"] == task) <= 1
    for entry in entries:
        model, card = load_model(entry["name"])
        assert card.get("task", "segmentation") == entry["task"]
        assert card["weights_file"] == entry["file"] and (BUNDLED_MODELS_DIR / entry["file"]).stat().st_size <= MAX_BUNDLED_BYTES
        assert card["training"]["command"].startswith("airway train") and "validation" in card and "input_spec" in card


def test_a_stage1_run_saved_before_tasks_existed_resumes(tmp_path) -> None:
    """Checkpoints written before configs had ``task`` and ``[connection]`` resume unchanged."""
    config = config_from_dict(tiny(schedule={"epochs": 1, "iterations_per_epoch": 1}, sampling={"hard_mining_every": 0}))
    train(config, tmp_path)
    checkpoint = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    sidecar = json.loads(checkpoint["sidecar"])
    for key in ("task", "connection"):
        del sidecar["config"][key]
    del sidecar["config"]["loss"]["tang_form"]  # nor loss.tang_form: Tang's eq. 2 as printed was the only form
    checkpoint["sidecar"] = json.dumps(sidecar)
    torch.save(checkpoint, tmp_path / "last.pt")
    longer = tiny(schedule={"epochs": 2, "iterations_per_epoch": 1}, sampling={"hard_mining_every": 0})
    with pytest.raises(AirwayInputError, match="another configuration"):
        train(config_from_dict({**longer, "loss": {"tang_form": "gul"}}), tmp_path)
    assert train(config_from_dict(longer), tmp_path).epochs == 2  # the default is "printed"
