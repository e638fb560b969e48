"""The ``rlctl`` command line (click + rich)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rlctl import __version__
from rlctl.errors import RlctlError

console = Console()
err_console = Console(stderr=True)


class _Group(click.Group):
    """Report rlctl errors as one red line (per problem) with exit code 2, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RlctlError as exc:
            for line in str(exc).splitlines():
                err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
            sys.exit(getattr(exc, "exit_code", 2))  # 130 after an interrupt, like a shell


def _recipe_path(recipe: str) -> Path:
    """A path, or the name of a recipe shipped with rlctl (``quickstart``, ``grpo`` ...)."""
    path = Path(recipe)
    if path.exists() or path.suffix:
        return path
    from rlctl.scaffold import shipped_recipe

    return shipped_recipe(recipe) or path


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rlctl")
def cli() -> None:
    """rlctl: reinforcement-learning post-training of language models, one plugin per algorithm."""


set_option = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                          help="Override a recipe value, e.g. --set loss.clip_high=0.28 (repeatable).")


@cli.command()
@click.argument("recipe")
@set_option
@click.option("--output-dir", "-o", type=click.Path(file_okay=False), help="Run directory (default: [train] output_dir).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing run in the run directory (only the files rlctl wrote are removed).")
@click.option("--resume", "resume", is_flag=False, flag_value="latest", default=None, metavar="[PATH|latest]",
              help="Continue from a checkpoint: the newest of the run directory (no value or 'latest'), "
                   "or a checkpoint directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress view.")
@click.option("--processes", type=click.IntRange(min=1), default=None, metavar="N",
              help="Train in N processes on this machine (data parallel; gloo on CPU, one GPU each with GPUs), "
                   "started by torch's elastic launcher like torchrun --standalone --nproc-per-node N. "
                   "Default: one process.")
def run(recipe: str, overrides: tuple[str, ...], output_dir: str | None, overwrite: bool, resume: str | None,
        quiet: bool, processes: int | None) -> None:
    """Train with RECIPE (a .toml file or the name of a shipped recipe).

    Ctrl-C (or SIGTERM) finishes the current step, writes a checkpoint and exits with 130; a second
    Ctrl-C stops at once.
    """
    from rlctl.train import rundir
    from rlctl.recipe import load_recipe
    from rlctl.trainer import Trainer

    if resume and overwrite:
        raise click.UsageError("--resume and --overwrite exclude each other")
    if processes is not None and processes > 1:
        argv = [recipe, *(arg for item in overrides for arg in ("--set", item))]
        argv += ["--output-dir", output_dir] if output_dir else []
        argv += ["--overwrite"] if overwrite else []
        argv += [f"--resume={resume}"] if resume else []
        argv += ["--quiet"] if quiet else []
        _launch(processes, recipe, overrides, output_dir, overwrite, resume, argv)
        return
    parsed = load_recipe(_recipe_path(recipe), overrides)
    trainer = Trainer(parsed, output_dir=output_dir, overwrite=overwrite, show_progress=not quiet, resume=resume)
    if trainer.engine.is_main:
        # refused before anything is printed; only the main process checks, since it is the one that
        # claims the directory: another process checking while it writes the marker would see a
        # half-made directory and refuse it
        rundir.check_claim(trainer.output_dir, overwrite=overwrite, resume=bool(resume),
                           entries=rundir.run_entries(parsed))
        err_console.print(f"[bold]rlctl[/] {parsed.name}: {parsed.total_steps} steps in "
                          f"{len(parsed.stages)} stage(s) -> {trainer.output_dir}", highlight=False)
    summary = trainer.run()
    trainer.print_summary(summary)


def _launch(count: int, recipe: str, overrides: tuple[str, ...], output_dir: str | None, overwrite: bool,
            resume: str | None, argv: list[str]) -> None:
    """``rlctl run ARGV`` in ``count`` processes on this machine; exits with their status.

    This process becomes the launcher: it calls what ``torchrun`` calls (``torch.distributed.run``'s
    argument parser and ``run``, also what ``accelerate launch`` uses), with ``--standalone`` so that the
    launcher picks a free rendezvous port itself (no port to choose and race for) and the same flags as
    the documented ``torchrun --nproc-per-node N -m rlctl run ...``. Run in-process rather than as a
    ``torchrun`` subprocess, a failing process comes back as an exception: rlctl prints one line for it
    and exits with that process's status, instead of the launcher's traceback.
    """
    import logging

    import torch

    from rlctl.recipe import load_recipe
    from rlctl.train import rundir

    if os.environ.get("WORLD_SIZE"):
        raise RlctlError(f"--processes {count}: this process is already one of {os.environ['WORLD_SIZE']} "
                         "started by a launcher (torchrun, accelerate launch); use one or the other")
    # recipe and run directory are checked once here, before any process starts (no user code runs)
    parsed = load_recipe(_recipe_path(recipe), overrides, user_code=False)
    for stage in parsed.stages:
        if stage.train.prompts_per_step % count:
            where = f"stage {stage.name!r}: " if len(parsed.stages) > 1 else ""
            raise RlctlError(f"--processes {count}: {where}[train] prompts_per_step = {stage.train.prompts_per_step} "
                             "must be a multiple of the number of processes so that every process gets whole groups")
    if parsed.train.device != "cpu" and torch.cuda.is_available() and count > torch.cuda.device_count():
        raise RlctlError(f"--processes {count}: this machine has {torch.cuda.device_count()} GPU(s) and each "
                         "process needs its own; pass at most that many, or [train] device = \"cpu\"")
    out = rundir.output_dir_path(parsed.train.output_dir, parsed.name, explicit=output_dir)
    rundir.check_claim(out, overwrite=overwrite, resume=bool(resume), entries=rundir.run_entries(parsed))

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run as launch

    if "LOGLEVEL" not in os.environ:  # the launcher's own log lines (LOGLEVEL=INFO shows them)
        for name in list(logging.Logger.manager.loggerDict):
            if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run")):
                logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        launch(parse_args(["--standalone", "--nproc-per-node", str(count), "--module", "rlctl", "run", *argv]))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -N: killed by signal N
        err_console.print(f"[bold red]error:[/] process {rank} of {count} failed with exit code {code} "
                          "(its output is above); the other processes were stopped", highlight=False, soft_wrap=True)
        sys.exit(code)
    except SignalException as exc:  # Ctrl-C or SIGTERM: passed on to every process, which checkpoint and stop
        sys.exit(128 + int(exc.sigval))
    except KeyboardInterrupt:
        sys.exit(130)


@cli.command()
@click.argument("recipe")
@set_option
def validate(recipe: str, overrides: tuple[str, ...]) -> None:
    """Check RECIPE without training and print it fully resolved (includes, overrides, defaults).

    Runs no user code: callable references are looked up, not imported, and trust_remote_code is not
    honoured (both happen at run).
    """
    from rlctl.recipe import dumps_toml, load_recipe, resolved_dict

    parsed = load_recipe(_recipe_path(recipe), overrides, user_code=False)
    click.echo(dumps_toml(resolved_dict(parsed)), nl=False)
    err_console.print(f"[green]ok[/]: {parsed.source} ({parsed.total_steps} steps, "
                      f"{len(parsed.stages)} stage(s))", highlight=False)


@cli.command(name="check-parity")
@click.argument("recipe")
@set_option
@click.option("--steps", type=click.IntRange(min=1), default=3, show_default=True,
              help="Steps to run in each stage (the first compares the checkpoint; later ones the pushed weights).")
@click.option("--tolerance", type=float, default=1e-2, show_default=True,
              help="Largest accepted |log p_sampler - log p_trainer| of one token, in nats.")
def check_parity(recipe: str, overrides: tuple[str, ...], steps: int, tolerance: float) -> None:
    """Measure how far RECIPE's sampler's log-probs are from the trainer's (e.g. vLLM's), in a short run."""
    from rlctl.parity_check import COLUMNS, measure, verdict

    rows = measure(_recipe_path(recipe), overrides, steps)
    table = Table(show_header=True, header_style="bold")
    for column in ("step", "stage", "mean |gap|", "max |gap|", "seq ratio min", "seq ratio max"):
        table.add_column(column)
    for r in rows:
        table.add_row(str(r["step"]), str(r.get("stage", "")), *(f"{r[c]:.3g}" for c in COLUMNS))
    console.print(table)
    ok, line = verdict(rows, tolerance)
    if not ok:
        raise RlctlError(line)
    console.print(f"[green]{line}[/]", highlight=False)


@cli.command(name="plugins")
@click.option("--kind", type=click.Choice(["sampler", "reward", "advantage", "loss", "scheduler"]),
              help="Only this kind of component.")
@click.option("--verbose", "-v", is_flag=True,
              help="Also show each component's description and options (name, type, default).")
def plugins_cmd(kind: str | None, verbose: bool) -> None:
    """List the installed components: kind, name, description, paper, plugin, package."""
    import re

    from rlctl import plugins
    from rlctl.scaffold import doc_summary

    title = re.compile(r'"([A-Z][^"]{11,})"')  # a quoted paper title in a docstring summary

    def describe(factory) -> tuple[str, str]:
        """One line of description and the paper: the factory's ``paper`` attribute, else the first quoted
        title of its docstring summary (the convention of the built-in components)."""
        summary = doc_summary(factory)
        found = title.search(summary)
        paper = getattr(factory, "paper", "") or (found.group(1) if found else "")
        # the title has its own line: drop the parenthesis that cites it, and the code markup
        text = re.sub(r'\s*\([^()"]*"[^"]*"[^()]*\)', "", summary).replace("``", "")
        sentence = re.split(r"(?<=[.;])(?<!Dr\.)(?<!e\.g\.)(?<!i\.e\.)\s", text, maxsplit=1)[0].strip()
        return (sentence[:97] + "...") if len(sentence) > 100 else sentence, paper

    reg = plugins.registry()
    shown = [comp for comp in plugins.components() if kind is None or comp.kind == kind]
    if verbose:
        _print_verbose(shown)
    else:
        # one line per component (kind, name, plugin, package) and, indented below it, its description
        # and paper: plain lines read at any terminal width, where a table would squeeze the text away
        rows = [(comp.kind, comp.name, comp.plugin, f"{comp.package} {comp.version}") for comp in shown]
        widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(("kind", "name", "plugin"))]
        click.echo(f"{'kind':<{widths[0]}}  {'name':<{widths[1]}}  {'plugin':<{widths[2]}}  package")
        for comp, row in zip(shown, rows):
            click.echo("  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths)) + f"  {row[3]}")
            description, paper = describe(comp.factory)
            if description:
                click.echo(f"    {description}")
            if paper:
                click.echo(f'    paper: "{paper}"')
    for message in reg.conflicts.values():
        err_console.print(f"[yellow]conflict:[/] {escape(message)}", highlight=False)
    for message in reg.failed.values():
        err_console.print(f"[red]failed:[/] {escape(message)}", highlight=False)


def _print_verbose(components: list) -> None:
    """One block per component: header, docstring summary, then its options (plain text, no wrapping)."""
    from rlctl.scaffold import describe_factory, format_options

    for i, comp in enumerate(components):
        info = describe_factory(comp.factory)
        if i:
            click.echo()
        click.echo(f"{comp.kind} {comp.name}  (plugin {comp.plugin}, package {comp.package} {comp.version})")
        if info.summary:
            click.echo(f"  {info.summary}")
        for line in format_options(info, indent="    "):
            click.echo(line)


@cli.group(name="new")
def new_group() -> None:
    """Create a recipe from a template, or a plugin package that adds components."""


@new_group.command(name="recipe")
@click.argument("name", required=False)
@click.option("--from", "template", metavar="TEMPLATE",
              help="The template: a recipe shipped with rlctl (see --list).")
@click.option("--output", "-o", type=click.Path(),
              help="File to write (.toml), or a folder for NAME.toml (default: ./NAME.toml).")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.option("--list", "list_templates", is_flag=True, help="List the templates and exit.")
def new_recipe_cmd(name: str | None, template: str | None, output: str | None, force: bool,
                   list_templates: bool) -> None:
    """Write recipe NAME.toml from a template, with comments on how to run and change it."""
    from rlctl.scaffold import new_recipe, recipe_templates, template_summary

    templates = recipe_templates()
    if list_templates:
        width = max((len(t) for t in templates), default=0)
        for tname, path in templates.items():
            click.echo(f"{tname:<{width}}  {template_summary(path)}".rstrip())
        return
    if not name:
        raise click.UsageError("missing NAME (or pass --list to see the templates)")
    if not template:
        raise click.UsageError(f"missing --from TEMPLATE; templates: {', '.join(templates)}")
    written = new_recipe(name, template, output, force)
    recipe = written[0]
    for path in written:
        click.echo(f"wrote {path}")
    click.echo(f"next: rlctl validate {recipe}  then  rlctl run {recipe}")


@new_group.command(name="plugin", short_help="Create a pip-installable plugin package NAME/.")
@click.argument("name")
@click.option("--kind", "kinds", multiple=True, metavar="KIND",
              help="Kind of component to provide: sampler, reward, advantage, loss, scheduler, observer, environment or "
                   "all (repeat or separate with commas; default: reward).")
@click.option("--output", "-o", type=click.Path(file_okay=False),
              help="Folder in which to create the package folder NAME (default: the current folder).")
@click.option("--force", is_flag=True, help="Write into an existing, non-empty package folder.")
def new_plugin_cmd(name: str, kinds: tuple[str, ...], output: str | None, force: bool) -> None:
    """Create NAME/, a pip-installable plugin package with a working example component per kind,
    tests, a README and an example recipe."""
    from rlctl.scaffold import new_plugin, plugin_names

    root = new_plugin(name, kinds, output, force)
    module = plugin_names(name).module
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        click.echo(f"wrote {path}")
    click.echo(f"next: pip install -e {root}  then  rlctl plugins --verbose  and  "
               f"rlctl run {root / 'recipes' / 'example.toml'}  (components: use = \"{module}\")")


@new_group.command(name="environment", short_help="Create a pip-installable environment package NAME/.")
@click.argument("name")
@click.option("--output", "-o", type=click.Path(file_okay=False),
              help="Folder in which to create the package folder NAME (default: the current folder).")
@click.option("--force", is_flag=True, help="Write into an existing, non-empty package folder.")
def new_environment_cmd(name: str, output: str | None, force: bool) -> None:
    """Create NAME/, a pip-installable package with a working multi-turn environment, tests, a README
    and an example recipe (the author's guide: docs/environments.md)."""
    from rlctl.scaffold import new_plugin, plugin_names

    root = new_plugin(name, ["environment"], output, force)
    module = plugin_names(name).module
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        click.echo(f"wrote {path}")
    click.echo(f"next: pip install -e {root}  then  rlctl run {root / 'recipes' / 'example.toml'}  "
               f"([sampler.env] use = \"{module}\")")


@cli.command(name="eval")
@click.argument("target")
@click.option("--checkpoint", help="A checkpoint or model directory (default: the run's final model).")
@click.option("--k", "ks", type=int, multiple=True, default=(1,), show_default=True,
              help="pass@k to report (repeatable).")
@click.option("--samples", type=int, default=0, help="Sampled completions per prompt (default: the largest k).")
@click.option("--num-prompts", type=int, default=0, help="Held-out prompts to use (default: [eval] num_prompts).")
@click.option("--output", "-o", type=click.Path(dir_okay=False), help="JSON file (default: TARGET/eval.json).")
@click.option("--seed", type=int, default=0, show_default=True)
def eval_cmd(target: str, checkpoint: str | None, ks: tuple[int, ...], samples: int, num_prompts: int,
             output: str | None, seed: int) -> None:
    """Greedy accuracy and pass@k on held-out prompts, scored with the recipe's rewards.

    TARGET is a run directory (its recipe and final model) or a recipe file (its model, or --checkpoint).
    """
    from rlctl.evaluate import run_eval
    from rlctl.metrics import summary_table

    if samples and samples < max(ks):
        raise click.UsageError(f"--samples {samples} is fewer than the largest --k {max(ks)}")
    record, path = run_eval(target, checkpoint, ks=ks, samples=samples, num_prompts=num_prompts,
                            output=output, seed=seed)
    console.print(summary_table(f"eval: {record['model']}", {k: v for k, v in record.items()
                                                             if k not in ("recipe", "model")}))
    console.print(f"written to {path}", highlight=False)


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help="PNG file (default: report.png in the first run directory).")
def report(runs: tuple[str, ...], output: str | None) -> None:
    """Plot reward, accuracy, KL, entropy, length and tokens/s of one or more RUNS, and summarise them."""
    from rlctl.metrics import summary_table
    from rlctl.report import make_report

    out = Path(output) if output else Path(runs[0]) / "report.png"
    for summary in make_report(runs, out):
        console.print(summary_table(summary.pop("run"), summary))
    console.print(f"figure written to {out}", highlight=False)


@cli.command(name="tiny-model")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--arch", type=click.Choice(["llama", "qwen2"]), default="llama", show_default=True)
@click.option("--hidden-size", default=64, show_default=True)
@click.option("--num-layers", default=2, show_default=True)
@click.option("--num-heads", default=4, show_default=True)
@click.option("--seed", default=0, show_default=True)
def tiny_model(path: str, arch: str, hidden_size: int, num_layers: int, num_heads: int, seed: int) -> None:
    """Build a tiny random model + character tokenizer at PATH (loads with from_pretrained)."""
    from rlctl.models import build_tiny_model

    out = build_tiny_model(path, arch=arch, hidden_size=hidden_size, num_layers=num_layers,
                           num_heads=num_heads, seed=seed)
    console.print(f"tiny {arch} model written to {out}")


@cli.command("import-model")
@click.argument("source")
@click.argument("output", required=False, type=click.Path(file_okay=False))
def import_model(source: str, output: str | None) -> None:
    """Convert a GGUF file (a path, or PACKAGE:FILE inside an installed Python package) into a
    from_pretrained directory of safetensors at OUTPUT (default: the rlctl cache); prints the directory."""
    from rlctl.model_import import import_gguf, require_gguf, resolve_gguf

    require_gguf("import-model")
    path = resolve_gguf(source, key="import-model SOURCE")
    console.print(f"converting {path} (dequantised to float32) ...", highlight=False)
    out = import_gguf(path, output)
    console.print(f"model written to {out}; use it with [model] name = \"{out}\"", highlight=False)


def main() -> None:
    try:
        cli(prog_name="rlctl")
    except SystemExit as exc:
        if int(os.environ.get("WORLD_SIZE") or 1) > 1:
            _end_launched_process(exc.code)
        raise


def _end_launched_process(code: object) -> None:
    """End one process of a multi-process run without the interpreter's teardown.

    Sharded and data-parallel models keep the gloo process group alive through references (device
    mesh, FSDP state) after it was destroyed; released during the interpreter's teardown, its worker
    threads can abort the process (SIGABRT, "terminate called without an active exception") after the
    run succeeded, and the launcher then reports the whole run failed. Everything the run writes is
    closed by then (checkpoints, metrics, trackers), so only the console streams need flushing.
    """
    import logging

    if isinstance(code, str):
        print(code, file=sys.stderr)
    status = code if isinstance(code, int) else (0 if code is None else 1)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


if __name__ == "__main__":
    main()
