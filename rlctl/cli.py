"""The ``rlctl`` command line (click + rich)."""

from __future__ import annotations

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
            sys.exit(2)


def _recipe_path(recipe: str) -> Path:
    """A path, or the name of a recipe shipped with rlctl (``quickstart``, ``grpo`` ...)."""
    path = Path(recipe)
    if path.exists() or path.suffix:
        return path
    from importlib import resources

    shipped = resources.files("rlctl_recipes") / f"{recipe}.toml"
    return Path(str(shipped)) if shipped.is_file() else path


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
@click.option("--overwrite", is_flag=True, help="Replace an existing run in the run directory.")
@click.option("--quiet", "-q", is_flag=True, help="No progress view.")
def run(recipe: str, overrides: tuple[str, ...], output_dir: str | None, overwrite: bool, quiet: bool) -> None:
    """Train with RECIPE (a .toml file or the name of a shipped recipe)."""
    from rlctl.recipe import load_recipe
    from rlctl.trainer import Trainer

    parsed = load_recipe(_recipe_path(recipe), overrides)
    trainer = Trainer(parsed, output_dir=output_dir, overwrite=overwrite, show_progress=not quiet)
    err_console.print(f"[bold]rlctl[/] {parsed.name}: {parsed.total_steps} steps in "
                      f"{len(parsed.stages)} stage(s) -> {trainer.output_dir}", highlight=False)
    summary = trainer.run()
    trainer.print_summary(summary)


@cli.command()
@click.argument("recipe")
@set_option
def validate(recipe: str, overrides: tuple[str, ...]) -> None:
    """Check RECIPE without training and print it fully resolved (includes, overrides, defaults)."""
    from rlctl.recipe import dumps_toml, load_recipe, resolved_dict

    parsed = load_recipe(_recipe_path(recipe), overrides)
    click.echo(dumps_toml(resolved_dict(parsed)), nl=False)
    err_console.print(f"[green]ok[/]: {parsed.source} ({parsed.total_steps} steps, "
                      f"{len(parsed.stages)} stage(s))", highlight=False)


@cli.command(name="plugins")
@click.option("--kind", type=click.Choice(["sampler", "reward", "advantage", "loss", "scheduler"]),
              help="Only this kind of component.")
def plugins_cmd(kind: str | None) -> None:
    """List the components every installed plugin provides: name, kind, package, version."""
    from rlctl import plugins

    reg = plugins.registry()
    table = Table(show_header=True, header_style="bold")
    for column in ("kind", "name", "plugin", "package", "version"):
        table.add_column(column)
    for comp in plugins.components():
        if kind is None or comp.kind == kind:
            table.add_row(comp.kind, comp.name, comp.plugin, comp.package, comp.version)
    console.print(table)
    for message in reg.conflicts.values():
        err_console.print(f"[yellow]conflict:[/] {escape(message)}", highlight=False)
    for message in reg.failed.values():
        err_console.print(f"[red]failed:[/] {escape(message)}", highlight=False)


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


def main() -> None:
    cli(prog_name="rlctl")


if __name__ == "__main__":
    main()
