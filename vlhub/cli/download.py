"""`vlhub download`: a model into its hub client's cache, resumable and verified.

Examples:
    vlhub download qwen2-vl-7b
    vlhub download Qwen/Qwen2.5-VL-3B-Instruct --include "*.json" --include "*.safetensors"
    HF_ENDPOINT=https://hf-mirror.com vlhub download qwen2-vl-2b
    vlhub download qwen2-vl-2b --source modelscope --json
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from vlhub.catalog import ModelSpec
from vlhub.cli._errors import reports_errors
from vlhub.cli._options import JsonOpt
from vlhub.cli._output import byte_progress, print_json, stderr, stdout
from vlhub.hub.download import SOURCES
from vlhub.hub.fetch import open_download
from vlhub.units import format_size

ModelArg = Annotated[str, typer.Argument(metavar="MODEL", help="A catalog name (qwen2-vl-7b) or a repo id (Qwen/Qwen2-VL-7B-Instruct).", show_default=False)]
SourceOpt = Annotated[str, typer.Option("--source", help=f"Where from: {' or '.join(SOURCES)}.")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit (default: main; ModelScope: master).")]
IncludeOpt = Annotated[list[str] | None, typer.Option("--include", help="Only files matching this glob (repeatable).")]
ExcludeOpt = Annotated[list[str] | None, typer.Option("--exclude", help="Skip files matching this glob (repeatable).")]
EndpointOpt = Annotated[
    str | None,
    typer.Option("--endpoint", help="Hub URL, e.g. a mirror (default: HF_ENDPOINT or MODELSCOPE_ENDPOINT, else the official hub)."),
]


@reports_errors
def download(
    model: ModelArg,
    source: SourceOpt = "huggingface",
    revision: RevisionOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    endpoint: EndpointOpt = None,
    json: JsonOpt = False,
) -> None:
    """Download a model into the hub client's own cache (HF_HOME, or MODELSCOPE_CACHE) and print its path.

    The total size is checked against free disk first; connection errors and 5xx are retried with backoff; an
    interrupted file resumes where it stopped, also in the next run; every file is checked against the hash
    the hub lists (a mismatch is deleted and named); one download per model and revision at a time."""
    result = fetch_model(model, source=source, revision=revision, include=include, exclude=exclude,
                         endpoint=endpoint)
    if json:
        print_json(result)
    else:
        stdout.print(escape(result["path"]))


def fetch_model(model: str, *, source: str = "huggingface", revision: str | None = None,
                include: list[str] | None = None, exclude: list[str] | None = None,
                endpoint: str | None = None) -> dict:
    """Download with a progress bar on stderr; the result as `vlhub download --json` prints it."""
    def waiting(holder: str) -> None:
        stderr.print(f"waiting for another download of {model} to finish ({holder})", markup=False, soft_wrap=True)

    with open_download(model, source=source, revision=revision, include=include, exclude=exclude,
                       endpoint=endpoint, on_wait=waiting) as job:
        total = sum(f.size for f in job.files)
        if job.missing_bytes:
            with byte_progress(f"downloading {job.ref.repo_id}", job.missing_bytes) as advance:
                path = job.fetch(on_bytes=advance)
        else:
            path = job.fetch()
    stderr.print(f"{job.ref}: {len(job.files)} files, {format_size(total)}, each checked against its listed hash "
                 f"({format_size(job.downloaded_bytes)} downloaded now)", markup=False, soft_wrap=True)
    return {"path": str(path), "model": job.ref.model, "repo": job.ref.repo_id, "source": job.ref.source,
            "revision": job.ref.revision, "commit": job.commit, "files": len(job.files), "total_bytes": total,
            "downloaded_bytes": job.downloaded_bytes, "verified": True}


def download_for(spec: ModelSpec) -> Path:
    """A catalog model that is not on this machine yet, downloaded (what `vlhub convert MODEL` needs first)."""
    stderr.print(f"{spec.name} is not in the cache: downloading {spec.hf_repo} first", markup=False, soft_wrap=True)
    return Path(fetch_model(spec.name)["path"])
