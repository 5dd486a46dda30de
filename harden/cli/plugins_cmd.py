"""`harden plugins`: what each entry-point group offers, and from which package."""

from __future__ import annotations

import json

import click

from .. import plugins
from ._group import main


@main.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print {group: {name: entry point}} as JSON.")
def plugins_command(as_json: bool) -> None:
    """List the installed plugins: fault models, memory layouts, passes, fault-map patterns.

    Plugins are Python packages that declare entry points in these groups (docs/plugins.md);
    harden's built-ins are registered the same way.

    \b
    Examples:
      harden plugins
      pip install plugins/harden-tiled && harden plugins --json
    """
    doc = {
        group: {name: " | ".join(f"{ep.value} ({plugins._origin(ep)})" for ep in eps)
                for name, eps in sorted(plugins.entry_points(group).items())}
        for group in plugins.GROUPS
    }
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    for group, entries in doc.items():
        click.echo(f"{group}")
        for name, where in entries.items():
            click.echo(f"  {name:<14} {where}")
