"""The shared training layer: LR schedule, atomic checkpoints, resume resolution, NaN guard, data sources."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_ssreg import data as ssreg_data
from diffusers_ssreg.config import SSRegConfig, add_config_arguments, config_from_args
from diffusers_ssreg.training import (
    NonFiniteGuard,
    get_paper_scheduler,
    list_checkpoints,
    paper_lr_factor,
    prune_checkpoints,
    resolve_resume_checkpoint,
)


# ----------------------------------------------------------------------------------------------
# LR schedule (A.5): warm-up from 1e-7 over 10 %, constant, cosine to 1e-6 over the last 50 %
# ----------------------------------------------------------------------------------------------


def test_paper_schedule_shape():
    base, total = 1e-5, 1000
    lr = [base * paper_lr_factor(s, total, base) for s in range(total + 1)]
    assert lr[0] == pytest.approx(1e-7)
    assert lr[50] == pytest.approx(1e-7 + (base - 1e-7) * 0.5)
    assert all(v == pytest.approx(base) for v in lr[100:501])
    assert lr[750] == pytest.approx(1e-6 + (base - 1e-6) * 0.5)
    assert lr[1000] == pytest.approx(1e-6)
    assert all(a >= b - 1e-15 for a, b in zip(lr[500:], lr[501:]))  # monotone decay


def test_scheduler_keeps_group_ratio():
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": params[:1], "lr": 1e-5}, {"params": params[1:], "lr": 1e-6}])
    scheduler = get_paper_scheduler(optimizer, 100, 1e-5)
    for _ in range(60):
        optimizer.step()
        scheduler.step()
    first, second = scheduler.get_last_lr()
    assert second == pytest.approx(first * 0.1)
    with pytest.raises(ValueError, match="num_training_steps"):
        get_paper_scheduler(optimizer, 0, 1e-5)


# ----------------------------------------------------------------------------------------------
# Checkpoint folders
# ----------------------------------------------------------------------------------------------


def test_resume_never_picks_an_unfinished_checkpoint(tmp_path):
    for name in ("checkpoint-5", "checkpoint-20", "checkpoint-30.tmp", "checkpoint-x", "logs"):
        os.makedirs(tmp_path / name)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["checkpoint-5", "checkpoint-20"]
    assert resolve_resume_checkpoint(str(tmp_path), "latest").endswith("checkpoint-20")
    assert resolve_resume_checkpoint(str(tmp_path), "checkpoint-5").endswith("checkpoint-5")
    assert resolve_resume_checkpoint(str(tmp_path / "empty"), "latest") is None
    assert resolve_resume_checkpoint(str(tmp_path), None) is None
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        resolve_resume_checkpoint(str(tmp_path), "checkpoint-99")


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        os.makedirs(tmp_path / f"checkpoint-{step}")
    os.makedirs(tmp_path / "checkpoint-5.tmp")  # an unfinished save is never counted as a checkpoint
    prune_checkpoints(str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "checkpoint-4", "checkpoint-5.tmp"]
    prune_checkpoints(str(tmp_path), 1)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-5.tmp"]
    prune_checkpoints(str(tmp_path), None)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4", "checkpoint-5.tmp"]


def test_nonfinite_guard_skips_then_stops():
    guard = NonFiniteGuard(max_consecutive=3)
    assert guard.check(torch.tensor(1.0), 1)
    assert not guard.check(torch.tensor(float("nan")), 2)
    assert not guard.check(torch.tensor(float("inf")), 3)
    assert guard.check(torch.tensor(2.0), 4)  # a good step resets the count
    assert not guard.check(torch.tensor(float("nan")), 5)
    assert not guard.check(torch.tensor(float("nan")), 6)
    with pytest.raises(FloatingPointError, match="3 non-finite steps in a row"):
        guard.check(torch.tensor(float("nan")), 7)
    assert guard.total_skipped == 5


# ----------------------------------------------------------------------------------------------
# --ssreg_* flags
# ----------------------------------------------------------------------------------------------


def test_every_config_field_has_a_flag():
    import argparse
    import dataclasses

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert {f"ssreg_{f.name}" for f in dataclasses.fields(SSRegConfig)} <= flags
    args = parser.parse_args(
        ["--ssreg_basis", "legendre", "--ssreg_grid", "2x8", "--ssreg_mean_centering", "false",
         "--ssreg_reference_resolution", "none", "--ssreg_alpha", "0"]
    )  # fmt: skip
    config = config_from_args(args, defaults={"lambda_lpips": 0.0})
    assert (config.basis, config.grid, config.mean_centering) == ("legendre", (2, 8), False)
    assert config.reference_resolution is None and config.alpha == 0 and config.lambda_lpips == 0
    assert config.lambda_z == SSRegConfig().lambda_z
    with pytest.raises(ValueError, match="alpha"):
        config_from_args(parser.parse_args(["--ssreg_alpha", "1.5"]))


# ----------------------------------------------------------------------------------------------
# Data sources
# ----------------------------------------------------------------------------------------------


def _photo(size=48, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8))


def test_folder_dataset_is_recursive_converts_modes_and_skips_bad_files(tmp_path, caplog):
    (tmp_path / "a" / "b").mkdir(parents=True)
    _photo().save(tmp_path / "one.jpg")
    _photo(seed=1).convert("L").save(tmp_path / "a" / "gray.png")
    _photo(seed=2).convert("RGBA").save(tmp_path / "a" / "b" / "alpha.webp")
    _photo(seed=3).convert("P").save(tmp_path / "a" / "b" / "palette.png")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not an image at all")
    whole = (tmp_path / "one.jpg").read_bytes()
    (tmp_path / "a" / "b" / "truncated.jpg").write_bytes(whole[: len(whole) * 2 // 3])  # the header is intact
    (tmp_path / "notes.txt").write_text("ignored")

    with caplog.at_level("INFO"):
        files = ssreg_data.find_images(str(tmp_path))
    # the scan opens every header: broken.jpg is left out there, truncated.jpg only fails when decoded
    assert len(files) == 5 and not any(f.endswith((".txt", "broken.jpg")) for f in files)
    assert "used 5 images, skipped 2: 1 other file types [.txt: 1]; 1 unreadable" in caplog.text
    dataset = ssreg_data.folder_image_dataset(str(tmp_path), ssreg_data.image_transform(32, center_crop=True))
    with caplog.at_level("WARNING"):
        examples = [dataset[i] for i in range(len(dataset))]
    for example in examples:
        assert example["pixel_values"].shape == (3, 32, 32)
        assert -1.0 <= example["pixel_values"].min() and example["pixel_values"].max() <= 1.0
    assert dataset.num_skipped == 1
    assert "Skipping unreadable image" in caplog.text and "truncated.jpg" in caplog.text


def test_bad_folders_raise(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ssreg_data.find_images(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        ssreg_data.find_images(str(tmp_path / "empty"))
    (tmp_path / "flat").mkdir()
    _photo().save(tmp_path / "flat" / "x.png")
    with pytest.raises(ValueError, match="class subfolders"):
        ssreg_data.folder_image_dataset(str(tmp_path / "flat"), lambda im: im, with_labels=True)


def test_class_folders_give_sorted_labels(tmp_path):
    for label in ("dog", "cat"):
        (tmp_path / label).mkdir()
        for i in range(2):
            _photo(seed=i).save(tmp_path / label / f"{i}.png")
    dataset = ssreg_data.folder_image_dataset(str(tmp_path), ssreg_data.image_transform(16), with_labels=True)
    labels = [int(dataset[i]["class_labels"]) for i in range(len(dataset))]
    assert labels == [0, 0, 1, 1]  # cat = 0, dog = 1


def test_seeded_augmentation_depends_only_on_seed_epoch_index():
    photos = [_photo(64, seed=s) for s in range(3)]
    transform = ssreg_data.random_scale_crop_transform(16)
    a = ssreg_data.ImageDataset(photos, transform, length=10, seed=7)
    b = ssreg_data.ImageDataset(photos, transform, length=10, seed=7)
    torch.manual_seed(123)
    first = a[4]["pixel_values"]
    torch.manual_seed(999)  # the global RNG does not matter
    assert torch.equal(first, b[4]["pixel_values"])
    b.set_epoch(1)
    assert not torch.equal(first, b[4]["pixel_values"])


def test_embedded_photos_and_fixed_crops():
    train, validation = ssreg_data.embedded_photos("train"), ssreg_data.embedded_photos("validation")
    assert len(train) >= 10 and len(validation) == 2
    assert all(im.mode == "RGB" and min(im.size) >= 256 for im in train + validation)
    crops = ssreg_data.fixed_crops(validation, 32, per_image=3, seed=1)
    assert crops.shape == (6, 3, 32, 32)
    assert torch.equal(crops, ssreg_data.fixed_crops(validation, 32, per_image=3, seed=1))
    with pytest.raises(ValueError, match="split"):
        ssreg_data.embedded_photos("test")


def test_datasets_by_name_on_a_local_folder(tmp_path):
    # `datasets.load_dataset(name)` with a local folder as the name: the same call as a Hub repo id.
    root = tmp_path / "data"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            _photo(40, seed=i).save(root / label / f"{i}.png")
    transform = ssreg_data.image_transform(16, center_crop=True)
    dataset = ssreg_data.hub_image_dataset(str(root), transform, label_column="label", cache_dir=str(tmp_path / "c"))
    assert len(dataset) == 6
    example = dataset[5]
    assert example["pixel_values"].shape == (3, 16, 16) and int(example["class_labels"]) == 1
    subset = ssreg_data.hub_image_dataset(str(root), transform, max_samples=2, cache_dir=str(tmp_path / "c"))
    assert len(subset) == 2
    with pytest.raises(ValueError, match="image_column"):
        ssreg_data.hub_image_dataset(str(root), transform, image_column="nope", cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="dataset_name"):
        ssreg_data.hub_image_dataset(str(tmp_path / "missing"), transform, cache_dir=str(tmp_path / "c"))


@pytest.mark.parametrize("fused", [True, False])
def test_optimizer_step_skips_nonfinite_gradients(fused, fresh_accelerate_state):
    from accelerate import Accelerator

    from diffusers_ssreg.training import optimizer_step

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    guard = NonFiniteGuard(max_consecutive=2)
    params = list(model.parameters())

    def step(scale):
        before = [p.detach().clone() for p in params]
        (model(torch.ones(1, 3)).sum() * scale).backward()
        optimizer_step(accelerator, optimizer, scheduler, params, 50.0, guard)
        return any(not torch.equal(b, p) for b, p in zip(before, params))

    assert step(1.0)  # a finite step updates the weights
    assert not step(float("nan"))  # a NaN step leaves them alone
    guard.raise_if_exhausted(2)
    assert guard.total_skipped == 1 and guard.consecutive == 1
    state_steps = [float(s["step"]) for s in optimizer.optimizer.state.values()]
    assert state_steps == [1.0, 1.0]  # Adam's step counter did not advance either
    assert not step(float("inf"))
    with pytest.raises(FloatingPointError, match="2 non-finite steps in a row"):
        guard.raise_if_exhausted(3)


def test_optimizer_step_without_clipping_measures_the_norm(fresh_accelerate_state):
    """max_grad_norm=None (the documented 'no clipping'): the full step is taken and the true norm returned."""
    from accelerate import Accelerator

    from diffusers_ssreg.training import optimizer_step

    accelerator = Accelerator(cpu=True)
    results = {}
    for clip in (None, 0.01):
        model = torch.nn.Linear(3, 1, bias=False)
        torch.nn.init.zeros_(model.weight)
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        (model(torch.full((1, 3), 100.0)).sum()).backward()  # gradient (100, 100, 100): norm 173.2
        norm = optimizer_step(accelerator, optimizer, scheduler, list(model.parameters()), clip, NonFiniteGuard(2))
        results[clip] = (float(norm), model.weight.detach().clone())
    assert results[None][0] == pytest.approx(173.205, rel=1e-4)
    assert torch.allclose(results[None][1], torch.full((1, 3), -100.0))  # unclipped SGD step
    assert results[0.01][1].norm().item() == pytest.approx(0.01, rel=1e-3)  # clipped to 0.01


# ----------------------------------------------------------------------------------------------
# The shared training loop: LR and data position on resume
# ----------------------------------------------------------------------------------------------


def test_set_scheduler_step_gives_the_schedule_of_the_step():
    from diffusers.optimization import get_scheduler

    from diffusers_ssreg.training import set_scheduler_step

    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": params[:1], "lr": 1e-3}, {"params": params[1:], "lr": 1e-4}])
    for make in (lambda: get_paper_scheduler(optimizer, 40, 1e-3),
                 lambda: get_scheduler("cosine", optimizer, num_warmup_steps=5, num_training_steps=40)):  # fmt: skip
        scheduler = make()
        by_step = [scheduler.get_last_lr()]  # the LR of every step, stepping once per update
        for _ in range(40):
            optimizer.step()
            scheduler.step()
            by_step.append(scheduler.get_last_lr())
        for step in (0, 7, 23, 39):
            set_scheduler_step(scheduler, step)
            assert scheduler.get_last_lr() == pytest.approx(by_step[step])
            assert [group["lr"] for group in optimizer.param_groups] == pytest.approx(by_step[step])
            scheduler.step()  # and it continues from there
            assert scheduler.get_last_lr() == pytest.approx(by_step[step + 1])
        assert by_step[23][1] == pytest.approx(by_step[23][0] * 0.1)  # the groups keep their ratio
    with pytest.raises(TypeError, match="LambdaLR"):
        set_scheduler_step(torch.optim.lr_scheduler.StepLR(optimizer, 3), 1)


@pytest.mark.parametrize(
    "state, batches_per_epoch, samples_per_batch, accumulation, expected",
    [
        ({"global_step": 5, "epoch": 1, "epoch_samples": 8}, 5, 2, 2, (1, 4, 0)),  # mid-epoch, same shape
        ({"global_step": 3, "epoch": 0, "epoch_samples": 10}, 5, 2, 2, (1, 0, 0)),  # an epoch's last update
        ({"global_step": 3, "epoch": 1, "epoch_samples": 4}, 2, 4, 1, (1, 1, 0)),  # saved by 2 x 2, resumed on 1 x 4
        ({"global_step": 3, "epoch": 1, "epoch_samples": 4}, 5, 2, 1, (1, 2, 0)),  # a smaller total batch
        ({"global_step": 1, "epoch": 0, "epoch_samples": 6}, 3, 4, 1, (0, 1, 2)),  # not a whole batch: 2 seen again
        ({"global_step": 5}, 5, 2, 2, (1, 4, 0)),  # no recorded position: ceil(5 / 2) = 3 updates an epoch
        ({"global_step": 4}, 5, 2, 2, (1, 2, 0)),
    ],
)
def test_resume_position(state, batches_per_epoch, samples_per_batch, accumulation, expected):
    from diffusers_ssreg.training import resume_position

    assert resume_position(state, batches_per_epoch, samples_per_batch, accumulation) == expected


def _loop_run(tmp_path, max_steps, resume=None):
    """A tiny regression through `TrainingLoop` (10 samples, batch 2, 2 micro-batches an update); the indices it saw."""
    import argparse

    from accelerate.state import AcceleratorState

    from diffusers_ssreg.training import TrainingLoop, add_training_arguments, optimizer_step, setup_accelerator

    AcceleratorState._reset_state(reset_partial_state=True)
    parser = argparse.ArgumentParser()
    add_training_arguments(parser)
    args = parser.parse_args(
        ["--output_dir", str(tmp_path), "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
         "--max_train_steps", str(max_steps), "--checkpointing_steps", "4", "--logging_steps", "1", "--report_to", "none",
         "--learning_rate", "0.1"] + (["--resume_from_checkpoint", resume] if resume else [])
    )  # fmt: skip
    accelerator, logging_dir = setup_accelerator(args)
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = get_paper_scheduler(optimizer, max_steps, 0.1)
    data = torch.utils.data.TensorDataset(torch.arange(10.0)[:, None])
    loader = torch.utils.data.DataLoader(data, batch_size=2, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    model, prepared, loader = accelerator.prepare(model, optimizer, loader)
    seen = []

    def step(batch):
        seen.append(batch[0].flatten().tolist())
        with accelerator.accumulate(model):
            loss = (model(batch[0] / 10) - 1).pow(2).mean()
            accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients:
                grad_norm = optimizer_step(accelerator, prepared, scheduler, list(model.parameters()), None, loop.guard)
        return {"loss": loss.detach()}, grad_norm

    loop = TrainingLoop(accelerator, args, loader, scheduler, step, logging_dir)
    loop.run()
    AcceleratorState._reset_state(reset_partial_state=True)
    return seen, [json.loads(line) for line in open(os.path.join(logging_dir, "train_metrics.jsonl"))], model


def test_loop_resumes_gradient_accumulation_at_the_right_batch(tmp_path):
    # 5 micro-batches an epoch, 2 per update: updates of 2, 2 and 1 micro-batches. checkpoint-4 lies mid-epoch 1.
    seen, logs, model = _loop_run(tmp_path / "straight", 8)
    assert len(seen) == 5 + 5 + 4 and [m["step"] for m in logs] == list(range(1, 9))
    state = json.loads((tmp_path / "straight" / "checkpoint-4" / "training_state.json").read_text())
    assert (state["epoch"], state["epoch_samples"], state["samples_seen"]) == (1, 4, 14)
    import shutil

    shutil.copytree(tmp_path / "straight" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    os.makedirs(tmp_path / "resumed" / "logs")
    with open(tmp_path / "resumed" / "logs" / "train_metrics.jsonl", "w") as f:  # with entries past the checkpoint
        f.writelines(json.dumps(m) + "\n" for m in logs[:6])
    resumed_seen, resumed_logs, resumed_model = _loop_run(tmp_path / "resumed", 8, resume="latest")
    assert resumed_seen == seen[7:]  # the micro-batches after the 4th update: epoch 1's third batch onwards
    assert [m["step"] for m in resumed_logs] == list(range(1, 9))  # each step once
    assert [m["lr"] for m in resumed_logs] == [m["lr"] for m in logs]
    assert torch.equal(model.weight, resumed_model.weight) and torch.equal(model.bias, resumed_model.bias)


def test_every_process_shards_one_data_order(fresh_accelerate_state):
    """The ranks' seeds differ (device-specific), but the epoch's order must not: else ranks shard different permutations."""
    import argparse
    import itertools

    from accelerate.state import AcceleratorState

    from diffusers_ssreg.training import add_training_arguments, setup_accelerator

    parser = argparse.ArgumentParser()
    add_training_arguments(parser)
    args = parser.parse_args(["--seed", "3", "--report_to", "none"])
    orders = []
    for process_seed in (3, 4):  # what set_seed(3, device_specific=True) gives ranks 0 and 1
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator, _ = setup_accelerator(args)
        torch.manual_seed(process_seed)
        loader = accelerator.prepare(torch.utils.data.DataLoader(list(range(20)), batch_size=4, shuffle=True))
        loader.set_epoch(1)
        orders.append([int(i) for i in itertools.chain(*loader)])
    assert orders[0] == orders[1] and sorted(orders[0]) == list(range(20))


def test_peak_memory_logs_give_every_rank(monkeypatch):
    """On CUDA the loop logs this process's peak memory and, with several processes, every rank's (gathered)."""
    from types import SimpleNamespace

    from diffusers_ssreg.training import peak_memory_logs

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**30)
    one = SimpleNamespace(device=torch.device("cpu"), num_processes=1, gather=None)
    assert peak_memory_logs(one) == {"peak_memory_gib": 3.0}
    # two ranks: the gather concatenates each rank's value (rank 1 peaked 1.5 GiB higher)
    two = SimpleNamespace(device=torch.device("cpu"), num_processes=2, gather=lambda t: torch.cat([t, t + 1.5]))
    assert peak_memory_logs(two) == {"peak_memory_gib": 3.0, "peak_memory_gib_rank0": 3.0, "peak_memory_gib_rank1": 4.5}
