"""Run under `torchrun --nproc_per_node 2` by tests/test_training.py: trains a tiny DETRIS for a few steps with the
accelerate loop with a TensorBoard tracker (whose end_training closes the process group: the run must still end
cleanly), then checks on every rank that the trained parameters are identical and that a gathered
evaluation counts every sample exactly once. Rank 0 writes the findings as JSON to argv[2]."""

import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator

sys.path.insert(0, sys.argv[3])
from training_helpers import tiny_recipe  # noqa: E402

from training.evaluation import eval_loader, evaluate_model, sentence_view  # noqa: E402
from training.train import build_processor, load_datasets, train  # noqa: E402


def main():
    output_dir, report = sys.argv[1], sys.argv[2]
    cfg = tiny_recipe(output_dir, epochs=1, per_device_batch_size=2, total_batch_size=4, eval_split=None,
                      log_with="tensorboard")
    datasets = load_datasets(cfg)
    summary = train(cfg, datasets=datasets)
    if not dist.is_initialized():  # end_training destroyed the group: form a new one (fresh store) for the checks
        dist.init_process_group("gloo", init_method=f"file://{os.path.abspath(output_dir)}/.checks-store",
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    accelerator = Accelerator(cpu=True)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(f"{output_dir}/final").eval()
    digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters() if p.requires_grad)).hexdigest()
    digests = [None] * accelerator.num_processes
    dist.all_gather_object(digests, digest)
    view = sentence_view(datasets["validation"], "all")
    if len(view) % 2 == 0:  # an odd count forces the sampler to pad the last batch with a duplicate
        view = view.select(range(len(view) - 1))
    loader = accelerator.prepare_data_loader(eval_loader(view, build_processor(model), batch_size=2))
    metrics, ious = evaluate_model(model, loader, build_processor(model), accelerator)
    if accelerator.is_main_process:
        with open(report, "w") as f:
            json.dump({"num_processes": accelerator.num_processes, "train_processes": summary["num_processes"],
                       "digests": digests, "eval_samples": metrics["num_samples"], "dataset_samples": len(view),
                       "per_sample": len(ious)}, f)


if __name__ == "__main__":
    main()
