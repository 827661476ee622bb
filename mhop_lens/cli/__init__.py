"""`mhop-lens`: one verb per analysis; each verb parses, calls the library and writes a run directory."""

from __future__ import annotations

import click

from mhop_lens.cli.bench import bench
from mhop_lens.cli.demo import demo
from mhop_lens.cli.evaluate import evaluate
from mhop_lens.cli.figures import figures
from mhop_lens.cli.gar import gar
from mhop_lens.cli.heads import COMMANDS as HEADS_COMMANDS
from mhop_lens.cli.hopping import COMMANDS as HOPPING_COMMANDS
from mhop_lens.cli.khop import organism_khop
from mhop_lens.cli.notebooks import COMMANDS as NOTEBOOK_COMMANDS
from mhop_lens.cli.organisms import organism, organism_gar
from mhop_lens.cli.patching import COMMANDS as PATCHING_COMMANDS
from mhop_lens.cli.rescue import khop, rescue
from mhop_lens.cli.runs import merge
from mhop_lens.cli.tuned_lens import tuned_lens


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="mhop_lens")
def main() -> None:
    """mhop_lens: where in a model are multi-hop queries resolved, and which heads compose relations?

    Start with `mhop-lens demo`; every verb writes a run directory (--out) with config.json, log.txt and parquet
    tables that `mhop-lens figures --run DIR` turns into figures.
    """


for _command in (demo, evaluate, *HOPPING_COMMANDS, *PATCHING_COMMANDS, gar, *HEADS_COMMANDS, figures, organism,
                 organism_gar, organism_khop, khop, rescue, merge, bench, tuned_lens, *NOTEBOOK_COMMANDS):
    main.add_command(_command)


if __name__ == "__main__":
    main()
