"""Train a ResNet/MLP classifier or a U-Net segmenter on any topology, with the same script.

    python scripts/train.py --model resnet18 --data digits --strategy single|dp
    torchrun --standalone --nproc_per_node=N scripts/train.py --strategy ddp ...
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --master_port=P --nproc_per_node=N scripts/train.py --strategy ddp ...
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N --num_machines 1 scripts/train.py --strategy ddp ...

``--batch-size`` is the GLOBAL batch: each of W processes reads batch/W samples per step (split further
into ``--grad-accum`` micro-batches), so every topology takes the same steps over the same samples, and a
checkpoint saved by any topology resumes on any other at the same step and sample cursor. The arithmetic is
the same up to float rounding only without BatchNorm (or with ``--sync-bn``) and without dropout; README,
"Global batch", says what holds where.

Options come from the flags (``--help``), or from ``--config FILE`` (YAML, TOML or JSON; keys are the option
names with ``_``) with flags given on the command line overriding the file. ``--print-config`` prints the
resolved options in that format and exits; every run records them in config.json and in each checkpoint's
manifest.

Outputs in --output-dir: checkpoints/ (step-N entries, ``latest``), config.json, metrics.csv, tensorboard/,
curves.png, summary.json. Bad input exits 2 with one line on stderr (``--debug`` shows the traceback).
The application is the ``training`` package; this file is its entry point.
"""
import launcher
import training

if __name__ == "__main__":
    launcher.run_main(training.cli)
