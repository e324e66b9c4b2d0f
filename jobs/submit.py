"""Submit a flashdmd job: ``python jobs/submit.py JOB [options] [section.key=value ...]``.

Resolves and validates the whole config before anything is submitted, so a bad key or value
fails here with a message that names it.  ``--dry-run`` prints the job plan and exits.
Otherwise the job goes through submitit (jobs/launcher.py): on Slurm the command returns once
the job is queued; on the local executor it waits for the job. ``pipeline`` submits stage 1,
then stage 2 with an ``afterok`` dependency on it and ``stage2.init_from`` set to stage 1's run
directory. Requests the cluster cannot serve (unknown partition, too many nodes, no sbatch)
fail before submission with a message saying what to change.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# only light modules before parsing: --help must answer without torch (preflight imports it)
from flashdmd.config import DEFAULT_PRESET, PRESET_DIR, Config, ConfigError, default_run_name, load_config  # noqa: E402
from jobs.cluster import ClusterError, check_request, require_sbatch  # noqa: E402
from jobs.plan import JOBS, PIPELINE, JobPlan, build_plan, render  # noqa: E402

# command-line option -> config key; options win over positional overrides
OPTION_KEYS = {
    "nodes": "launch.nodes",
    "gpus_per_node": "launch.gpus_per_node",
    "cpus_per_task": "launch.cpus_per_task",
    "mem": "launch.mem_gb",
    "partition": "launch.partition",
    "account": "launch.account",
    "qos": "launch.qos",
    "constraint": "launch.constraint",
    "time": "launch.time_minutes",
    "executor": "launch.executor",
    "name": "name",
}


# one line per job for --help, in the order of jobs.plan.JOBS
JOB_HELP = {
    "stage1": "train stage 1: distill the teacher into a few-step student (DMD + Pixel-GAN)",
    "stage2": "train stage 2: stage 1 alternating with preference RL against the latent reward model",
    "pipeline": "stage1, then stage2 starting from its run directory (on Slurm: an afterok dependency)",
    "export": "write a trained student as a diffusers pipeline folder (export.source, export.out_dir)",
    "sample": "generate images from a trained student (sample.source, sample.prompts_file, sample.out_dir)",
    "eval": "the paper's metrics of a trained student on a prompt set (eval.source, eval.prompts)",
    "watch": "a side job: evaluate a training run's checkpoints as they appear",
    "synth": "a synthetic training set: a teacher pipeline's images of a prompt set as shards (synth.prompts)",
}

DESCRIPTION = """\
Submit a flashdmd job to Slurm through submitit, or run it on this machine.

The whole config (preset <- options <- section.key=value overrides) is resolved and validated
before anything is submitted, so a bad key or value fails here, naming it. On Slurm the command
returns once the job is queued; with the local executor it waits for the job."""

EXAMPLES = """\
examples:
  # the plan of a 4-node SDXL stage-1 run, nothing submitted
  python jobs/submit.py stage1 --config sdxl-4step --nodes 4 --partition gpu --dry-run
  # the tiny default preset on this machine's CPU, with a changed TTUR and run name
  python jobs/submit.py stage1 --executor local --name try1 stage1.ttur=5"""


def _presets_help() -> str:
    """The presets of jobs/configs with the first line of their header comment (read, not parsed)."""
    lines = ["presets (--config NAME, or a YAML path; a YAML may start from one with 'base: NAME'):"]
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.stat().st_size else ""
        about = first.lstrip("# ").split(". ")[0].strip().rstrip(".") if first.startswith("#") else ""
        name = path.stem + (" (default)" if path.stem == DEFAULT_PRESET else "")
        lines.append(f"  {name:<20} {about}")
    return "\n".join(lines)


def _epilog() -> str:
    jobs = ["jobs:", *(f"  {job:<10} {JOB_HELP[job]}" for job in JOBS)]
    return "\n\n".join(["\n".join(jobs), _presets_help(), EXAMPLES])


def parse_args(argv: list[str]) -> argparse.Namespace:
    preset = "the preset's"
    parser = argparse.ArgumentParser(
        prog="jobs/submit.py", usage="%(prog)s JOB [options] [section.key=value ...]", description=DESCRIPTION,
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("job", choices=JOBS, metavar="JOB", help="what to run: one of the jobs listed below")
    parser.add_argument("--config", default=DEFAULT_PRESET, metavar="PRESET",
                        help=f"preset name in jobs/configs or a YAML path (default: {DEFAULT_PRESET})")
    parser.add_argument("--nodes", type=int, metavar="N", help=f"number of nodes (default: {preset} launch.nodes)")
    parser.add_argument("--gpus-per-node", type=int, metavar="N",
                        help=f"one task per GPU; processes per node on CPU (default: {preset} launch.gpus_per_node)")
    parser.add_argument("--cpus-per-task", type=int, metavar="N", help=f"(default: {preset} launch.cpus_per_task)")
    parser.add_argument("--mem", type=int, metavar="GB", help=f"memory per node in GB (default: {preset} launch.mem_gb)")
    parser.add_argument("--partition", help=f"Slurm partition (default: {preset} launch.partition, else the cluster's)")
    parser.add_argument("--account", help=f"Slurm account (default: {preset} launch.account)")
    parser.add_argument("--qos", help=f"Slurm QOS (default: {preset} launch.qos)")
    parser.add_argument("--constraint", help=f"Slurm node constraint (default: {preset} launch.constraint)")
    parser.add_argument("--time", type=int, metavar="MIN", help=f"time limit in minutes (default: {preset} launch.time_minutes)")
    parser.add_argument("--executor", choices=["auto", "slurm", "local"],
                        help=f"auto = slurm where sbatch is on PATH, else local (default: {preset} launch.executor)")
    parser.add_argument("--name", help="run name; the run directory is <run_root>/<name> (default: <preset>-<job>)")
    parser.add_argument("--dry-run", action="store_true", help="print the job plan and exit; nothing is submitted")
    parser.add_argument("--full-config", action="store_true", help="with --dry-run: print the whole resolved config")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in the run directory even where this config differs from its config.yaml")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, applied after the preset and before the options above")
    return parser.parse_intermixed_args(argv)


def resolve(args: argparse.Namespace, job: str | None = None) -> Config:
    """The validated config of ``job`` (default: the one asked for); pipeline stages get "<name>-<stage>"."""
    job = job or args.job
    options = [f"{key}={getattr(args, opt)}" for opt, key in OPTION_KEYS.items() if getattr(args, opt) is not None]
    cfg = load_config(args.config, [*args.overrides, *options])
    if job != args.job and cfg.name:  # pipeline with --name: one run directory per stage
        cfg.name = f"{cfg.name}-{job}"
    cfg.name = cfg.name or default_run_name(args.config, job)
    return cfg


def resolve_all(args: argparse.Namespace) -> list[tuple[str, Config]]:
    """(job, config) in submission order; stage 2 of a pipeline starts from stage 1's run directory."""
    if args.job != "pipeline":
        return [(args.job, resolve(args))]
    stage1, stage2 = (resolve(args, job) for job in PIPELINE)
    stage2.stage2.init_from = str(stage1.run_dir.resolve())
    return [("stage1", stage1), ("stage2", stage2)]


def check_cluster(plans: list[JobPlan]) -> None:
    """Requests the cluster cannot serve (no sbatch, unknown partition, too many nodes) fail here,
    before the preflight's imports (seconds); the launcher checks again when it submits."""
    for plan in plans:
        if plan.executor == "slurm":
            require_sbatch()
            check_request(plan.executor_params.get("partition", ""), plan.executor_params["nodes"])


def run(args: argparse.Namespace, configs: list[tuple[str, Config]]) -> int:
    from jobs import launcher  # submitit and torch load only when something is submitted

    previous = None
    for job, cfg in configs:
        plan = build_plan(job, args.config, cfg)
        dependency = ""
        if previous is not None:
            if plan.executor == "slurm":
                dependency = f"afterok:{previous.job_id}"
            else:  # the local executor has no dependencies: wait for the previous stage here
                launcher.wait(previous, follow=True)
        sub = launcher.submit(plan, cfg, dependency=dependency, resume=args.resume)
        print(sub.describe() + (f"\n  runs after:    {dependency}" if dependency else ""), flush=True)
        previous = sub
    if previous is not None and previous.plan.executor == "local":
        result = launcher.wait(previous, follow=True)[0]
        print(f"{previous.plan.job} finished in {previous.cfg.run_dir}; rank 0 returned {result}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        configs = resolve_all(args)
        plans = [build_plan(job, args.config, cfg) for job, cfg in configs]
        if args.dry_run:
            rendered = [render(plan, cfg, args.full_config) for plan, (_, cfg) in zip(plans, configs)]
            if len(rendered) > 1:
                rendered[1] += "\ndependency:     afterok on the stage-1 job (stage2.init_from = its run directory)"
            print("\n\n".join(rendered), flush=True)
        else:
            check_cluster(plans)
        from flashdmd.apps.preflight import preflight_all  # imports torch: after parsing

        if not args.dry_run:
            from jobs.toy_data import make_missing_toy_shards

            make_missing_toy_shards(configs)  # the tiny presets' shards on a fresh clone
        preflight_all(configs)  # missing inputs fail here, in a dry run too, before anything is queued
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except ClusterError as err:
        print(f"cannot submit: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    try:
        return run(args, configs)
    except ClusterError as err:
        print(f"cannot submit: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 -- sbatch's own refusal (submitit FailedJobError) or a failed local job
        print(f"{args.job}: {type(err).__name__}: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
