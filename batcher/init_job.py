"""`batcher init`: a commented example job and a small input, ready to run with `--mock`.

    batcher init mylabels          -> mylabels/job.yaml + mylabels/input.jsonl
    batcher init mylabels.yaml     -> mylabels.yaml + mylabels-input.jsonl beside it

A directory keeps a job's files together (job, input, output, journal); a name ending in
.yaml is for people who keep several jobs side by side. Existing files are never overwritten
without `force`.
"""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

from batcher.errors import JobSpecError, StorageError

EXAMPLE_RESOURCE = "example_job.yaml"
_INPUT_LINE = "input: input.jsonl"
_OUTPUT_LINE = "output: out/labels.parquet"

SAMPLE_ROWS: tuple[tuple[str, str], ...] = (
    ("keyboard", "Keys feel great and it survived a coffee spill. Would buy again."),
    ("keyboard", "Two keys stopped working after a week. Support never answered."),
    ("keyboard", "It types. Nothing special, nothing wrong."),
    ("water bottle", "Keeps water cold all day, even in the car in July."),
    ("water bottle", "The lid leaks into my bag every single time."),
    ("water bottle", "Fine bottle, a bit heavy."),
    ("headphones", "Sound is rich and the noise cancelling is superb on trains."),
    ("headphones", "Left ear cup crackles at any volume. Returned them."),
    ("headphones", "Comfortable for an hour, then they pinch."),
    ("desk lamp", "Bright, warm light and the arm stays where I put it."),
    ("desk lamp", "Flickers constantly; the dimmer buzzes."),
    ("desk lamp", "Does its job. The cable could be longer."),
    ("backpack", "Fits my laptop, lunch and a jacket; the straps are comfy."),
    ("backpack", "Zipper broke on day three."),
    ("backpack", "Looks smaller than in the photos but it is okay."),
    ("coffee grinder", "Consistent grind and quiet enough for early mornings."),
    ("coffee grinder", "Motor burnt out after a month of daily use."),
    ("coffee grinder", "Grinds coffee. Cleaning it is a chore."),
    ("phone case", "Dropped my phone twice on concrete, not a scratch."),
    ("phone case", "Yellowed within weeks and the buttons are stiff."),
)


def sample_input() -> str:
    """JSONL rows with the columns the example job uses: review_id, product, text."""
    return "".join(
        json.dumps({"review_id": f"r{i:03d}", "product": product, "text": text}) + "\n"
        for i, (product, text) in enumerate(SAMPLE_ROWS, start=1)
    )


def example_job_text() -> str:
    """The commented example job file shipped in the package."""
    return (importlib.resources.files("batcher") / EXAMPLE_RESOURCE).read_text(encoding="utf-8")


def _targets(path: Path) -> tuple[Path, Path, str]:
    """(job file, sample input, job file text) for a directory name or a .yaml name."""
    text = example_job_text()
    if path.suffix in (".yaml", ".yml"):
        stem = path.stem
        input_path = path.with_name(f"{stem}-input.jsonl")
        text = text.replace(_INPUT_LINE, f"input: {input_path.name}", 1)
        text = text.replace(_OUTPUT_LINE, f"output: out/{stem}.parquet", 1)
        return path, input_path, text
    return path / "job.yaml", path / "input.jsonl", text


def write_example(path: Path, *, force: bool = False) -> Path:
    """Write the example job and its sample input; return the job file's path.

    `path` is a directory to create (job.yaml + input.jsonl inside) or a file name ending
    in .yaml (the input goes beside it as <stem>-input.jsonl). Refuses to overwrite an
    existing file unless `force`.
    """
    path = Path(path)
    job_path, input_path, text = _targets(path)
    if path.suffix not in (".yaml", ".yml") and path.exists() and not path.is_dir():
        raise JobSpecError(f"{path} exists and is not a directory; choose another name")
    existing = [p for p in (job_path, input_path) if p.exists()]
    if existing and not force:
        raise JobSpecError(
            f"{existing[0]} already exists; choose another name, or pass --force to overwrite it"
        )
    try:
        job_path.parent.mkdir(parents=True, exist_ok=True)
        input_path.write_text(sample_input(), encoding="utf-8")
        job_path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise StorageError(
            f"cannot write the example job to {job_path.parent}: {exc.strerror or exc}"
        ) from None
    return job_path
