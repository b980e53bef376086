"""Re-renders a workdir's results.md and plots/*.png from its results.json, without rerunning.

    python -m experiments.report --workdir=DIR

Library: cpift_jax.benchmark.report (rerender -> write). Prints the paths written, results.md
first. A malformed results.json, or one written by another version, fails naming the file and key.
"""

from absl import app, flags

from cpift_jax.benchmark import console, report

_WORKDIR = flags.DEFINE_string("workdir", None, "pipeline workdir holding results.json",
                               required=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    console.setup()
    for path in report.rerender(_WORKDIR.value):
        print(path)


if __name__ == "__main__":
    app.run(main)
