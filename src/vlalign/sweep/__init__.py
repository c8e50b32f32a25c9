"""Ablation sweeps: ``vlalign sweep --config configs/sweeps/<name>.yaml``.

A sweep trains a set of named variants of one base pretraining config, each for a fixed number of optimizer steps
and several seeds, measures every run the same way (training metrics from TensorBoard, ``vlalign evaluate`` tasks on
the final ``last.ckpt``, per-objective cost when the run recorded it) and writes one table. Runs execute one after
another, each in its own process and folder (``--launcher slurm``: as a job array through submitit, same folders).

The spec (YAML; relative paths resolve against the working directory, then against the vlalign source checkout)::

    name: toy_ablation                # optional; default output folder sweeps/<name> (sweeps/<name>_quick, --quick)
    base: configs/pretrain/toy.yaml   # pretraining config (or a list: later files overlay earlier ones)
    reference: itc                    # optional: the variant deltas are taken against (default: the first)
    seeds: [0, 1]                     # --seed_everything and the data-order seed of each run
    steps: 800                        # fixed optimizer steps per run (the LR schedule spans exactly these)
    data:                             # optional; without it the base config's data paths are used
      synth: {num_train: 2000, num_val: 200, num_test: 200, seed: 0}   # `vlalign data synth`, once, into OUT/data
      # or explicit paths: tokenizer, train_shards, val_retrieval, test_retrieval, hardneg_val, hardneg_test
    warm_start:                       # optional shared first stage (below)
      steps: 250                      # its fixed optimizer steps
      objectives: {itc: on, itm: off, xmm: off, psl: off}   # as a variant's; overlays:, overrides: too
    env: {OMP_NUM_THREADS: 1}         # optional: environment of every run's processes
    overrides: [--trainer.log_every_n_steps 10]   # optional: every run (same forms as a variant's)
    variants:                         # ordered: name -> what differs from the base
      itc:
        objectives: {itm: off, xmm: off, psl: off}   # slot -> on | off | {settings}; unlisted slots stay as in base
      albef:
        description: ITC + ITM + text-side XMM       # optional, shown in results.md
        objectives: {xmm: {text: true, image: false}, psl: off}
        overlays: [no_psl]            # files in configs/ablations/ by name, or paths
        overrides:                    # "--key value" strings, or a mapping dotted.key: value
          model.itc.queue_size: 512
    evaluate:                         # measurements after each run, in this order
      - fit: {tags: ["train/*_loss", "train/itm_accuracy", "val/*"], average_last: 5}
      - retrieval: {config: configs/finetune/retrieval_tiny.yaml, split: test}
      - hardneg: {config: configs/finetune/hardneg_tiny.yaml}
    headline: [retrieval/itc/r_mean, hardneg/itm/all]   # optional: first table of results.md, cost plot
    quick: {steps: 200, seeds: [0], warm_start: {steps: 60}, data: {synth: {num_train: 500}}}   # --quick: merged
    slurm: {partition: gpu, gpus_per_node: 1, cpus_per_task: 8, mem_gb: 32, timeout_min: 240}

Objective slots are the registered built-in objectives (``vlalign.objectives.base.builtin_objectives()``):
``on`` (or ``true``) enables a slot with the base config's settings (the objective's defaults when the base disables
it), ``off`` (``false``, ``null``) disables it, a mapping enables it with these settings merged over the base's.
Each run is ``vlalign fit --config BASE --config OVERLAY... --config {objectives} [data paths] [overrides]
--seed_everything S --trainer.max_steps N --trainer.max_epochs -1 ...`` in ``OUT/runs/<variant>/seed<S>/``. Every
variant's full command line is parsed by the training CLI (unknown keys, types, cross-setting checks) before anything
runs. Evaluations: ``fit`` reads TensorBoard scalars of the run (mean of the last ``average_last`` logged values of
each tag matching ``tags``; keys ``fit/<tag>``); a task name runs ``vlalign evaluate <task> --model last.ckpt
--config CONFIG --split SPLIT --out RUN/eval/<name>`` (keys ``retrieval/itc/r_mean``, ``hardneg/itm/relation_swap``,
``hardneg/itm/all``; ``name:`` sets the prefix, ``metrics:`` glob patterns keep a subset, ``overrides:`` as above).

``warm_start:`` trains, for every seed, one run of the base config with its objectives (overlays, overrides) for its
``steps`` in ``OUT/runs/_warm_start/seed<S>/`` before that seed's variants (own process, status.json, skipped when
done, resumed, recorded when failed, no evaluations); each variant run of the seed then adds ``--model.init_from``
the warm start's final ``last.ckpt`` (the pretrained unimodal encoders of the paper, at toy scale). A variant's
fingerprint includes the warm start's, so a changed warm start retrains the variants; a variant whose warm start is
not done is recorded failed naming it, without training. ``model.init_from`` is then the sweep's: give it in a
variant's or the spec-wide overrides and the spec is refused (``warm_start.overrides`` may set the warm start's own
starting point). Warm-start runs are rows of results.csv with variant ``_warm_start``; results.md only states them.

Outputs in the sweep folder: ``runs/<variant>/seed<S>/`` (and ``runs/_warm_start/seed<S>/``) (``status.json``, ``train.log``, ``train/`` TensorBoard
and checkpoints, ``eval/<name>/results.json``), ``results.csv``, ``results.md``, ``plots/*.png``, ``tensorboard/``
(hparams view) and ``sweep.yaml`` (the spec as run). Modules: :mod:`~vlalign.sweep.spec` (format, validation),
:mod:`~vlalign.sweep.plan` (commands, data, config checks), :mod:`~vlalign.sweep.runner` (one run),
:mod:`~vlalign.sweep.launchers` (local, slurm), :mod:`~vlalign.sweep.results` (tables, plots, TensorBoard).
"""

from __future__ import annotations

from vlalign.sweep.spec import SweepSpec, load_spec

__all__ = ["SweepSpec", "load_spec"]
