"""`vlhub download`: `hf download`'s arguments and options with the same meanings, into the hub client's own cache
(or --local-dir), resumable and verified; catalog names (qwen2-vl-7b) work as repo ids.

Examples:
    vlhub download qwen2-vl-7b
    vlhub download Qwen/Qwen2-VL-7B-Instruct config.json tokenizer.json
    vlhub download Qwen/Qwen2.5-VL-3B-Instruct --include "*.json" --include "*.safetensors"
    vlhub download qwen2-vl-2b --local-dir ./qwen2-vl-2b && vlhub convert ./qwen2-vl-2b --to paddle
    vlhub download qwen2-vl-7b --dry-run
    HF_ENDPOINT=https://hf-mirror.com vlhub download qwen2-vl-2b
    vlhub download qwen2-vl-2b --source modelscope --json
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from vlhub.catalog import ModelSpec
from vlhub.cli._errors import reports_errors
from vlhub.cli._options import JsonOpt, choices
from vlhub.cli._output import byte_progress, print_json, stderr, stdout
from vlhub.errors import UserError
from vlhub.hub.download import DOWNLOAD_WORKERS, EVERYTHING, SOURCES, DownloadOptions
from vlhub.hub.fetch import Download, open_download
from vlhub.hub.records import RemoteFile, RepoRef
from vlhub.units import format_size, plural

REPO_TYPES = ("model", "dataset", "space", "kernel")  # `hf download --repo-type`'s; vlhub converts models only


RepoIdArg = Annotated[str, typer.Argument(metavar="REPO_ID", show_default=False, help=(
    "A repo id (Qwen/Qwen2-VL-7B-Instruct) or a catalog name (qwen2-vl-7b)."))]
FilenamesArg = Annotated[list[str] | None, typer.Argument(metavar="FILENAMES", show_default=False, help=(
    "Only these files (e.g. config.json); a name ending in / is a folder. Replaces --include/--exclude."))]
RepoTypeOpt = Annotated[str, typer.Option("--repo-type", "--type", metavar=choices(REPO_TYPES),
                                          help="The type of repository: vlhub downloads models only.")]
SourceOpt = Annotated[str, typer.Option("--source", metavar=choices(SOURCES), help="The hub to download from.")]
RevisionOpt = Annotated[str | None, typer.Option(
    "--revision", help="Branch, tag or commit (default: main; ModelScope: master).", show_default=False)]
IncludeOpt = Annotated[list[str] | None, typer.Option(
    "--include", help="Only files matching this glob (repeatable).", show_default=False)]
ExcludeOpt = Annotated[list[str] | None, typer.Option(
    "--exclude", help="Skip files matching this glob (repeatable).", show_default=False)]
CacheDirOpt = Annotated[Path | None, typer.Option(
    "--cache-dir", help="The hub cache to use instead of HF_HUB_CACHE (HF_HOME/hub).", show_default=False)]
LocalDirOpt = Annotated[Path | None, typer.Option("--local-dir", show_default=False, help=(
    "Plain files in this directory instead of the cache, as `hf download --local-dir` writes them "
    "(`vlhub convert DIR` takes it)."))]
ForceOpt = Annotated[bool, typer.Option("--force-download", help="Download every file again, even if it is there.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="List what would be downloaded, with sizes; write nothing.")]
TokenOpt = Annotated[str | None, typer.Option("--token", show_default=False, help=(
    "A token for gated or private repos (default: HF_TOKEN, or `hf auth login`'s)."))]
MaxWorkersOpt = Annotated[int, typer.Option("--max-workers", help="Files downloaded at once.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the path: no progress, no summary.")]
EndpointOpt = Annotated[str | None, typer.Option("--endpoint", show_default=False, help=(
    "Hub URL, e.g. a mirror (default: HF_ENDPOINT or MODELSCOPE_ENDPOINT, else the official hub)."))]


@reports_errors
def download(
    repo_id: RepoIdArg,
    filenames: FilenamesArg = None,
    repo_type: RepoTypeOpt = "model",
    revision: RevisionOpt = None,
    include: IncludeOpt = None,
    exclude: ExcludeOpt = None,
    cache_dir: CacheDirOpt = None,
    local_dir: LocalDirOpt = None,
    force_download: ForceOpt = False,
    dry_run: DryRunOpt = False,
    token: TokenOpt = None,
    max_workers: MaxWorkersOpt = DOWNLOAD_WORKERS,
    quiet: QuietOpt = False,
    source: SourceOpt = "huggingface",
    endpoint: EndpointOpt = None,
    json: JsonOpt = False,
) -> None:
    """Download a model as `hf download` does and print its path.

    Into the hub client's own cache (or --local-dir); the path printed is the snapshot's, or the one file's when
    one file is named. The total size is checked against free disk first; a hub that cannot be reached fails at once (exit 3) with
    what to do; 5xx and dropped connections are retried with backoff; an interrupted file resumes where it stopped,
    also in the next run; every file is checked against the hash the hub lists (a mismatch is deleted and named);
    one download per model and revision at a time. HF_HUB_OFFLINE=1: only the cache, no connection."""
    if repo_id.startswith("hf://"):
        repo_id, repo_type, revision, filenames = _from_uri(repo_id, repo_type, revision, filenames)
    if repo_type not in REPO_TYPES:
        raise UserError(f"--repo-type {repo_type!r}: choose one of {', '.join(REPO_TYPES)} (vlhub: model)")
    if repo_type != "model":
        raise UserError(f"{repo_id} is a {repo_type} repo: vlhub downloads models only (`hf download` fetches the "
                        "others)")
    names = tuple(filenames or ())
    folder = next((name for name in names if name.endswith("/")), None)
    if folder is not None and (include or exclude):  # hf download refuses it too: which would select is unclear
        raise UserError(f"{folder} is a folder: --include/--exclude do not combine with it; pass "
                        f'--include "{folder}*" (with --exclude if needed) instead')
    if names and (include or exclude):
        stderr.print("ignoring --include/--exclude: FILENAMES name the files (as `hf download` does)", markup=False,
                     soft_wrap=True)
    options = DownloadOptions(
        include=() if names else tuple(include or ()), exclude=() if names else tuple(exclude or ()), filenames=names,
        token=token, force=force_download, max_workers=max_workers, cache_dir=cache_dir, local_dir=local_dir,
        dry_run=dry_run, on_retry=_say)
    if dry_run:
        _dry_run(repo_id, source=source, revision=revision, options=options, endpoint=endpoint, as_json=json,
                 quiet=quiet)
        return
    result = fetch_model(repo_id, source=source, revision=revision, options=options, endpoint=endpoint, quiet=quiet)
    if len(names) == 1 and not names[0].endswith("/"):  # one file: its own path, as hf_hub_download returns it
        result = replace(result, path=result.path / names[0])
    if json:
        print_json(result.to_json())
    else:
        stdout.print(escape(str(result.path)), soft_wrap=True)


def _from_uri(uri: str, repo_type: str, revision: str | None,
              filenames: list[str] | None) -> tuple[str, str, str | None, list[str] | None]:
    """`hf://[models/]Org/Name[@rev][/path]` as `hf download` reads it: the repo, its type, the revision and a file
    or folder (a trailing / kept); the URI says them, so --repo-type, --revision and FILENAMES may not."""
    from huggingface_hub.errors import HfUriError
    from huggingface_hub.utils import parse_hf_uri

    try:
        parsed = parse_hf_uri(uri)
    except HfUriError as exc:
        raise UserError(f"{uri}: {exc}") from None
    if repo_type != "model" or revision is not None:
        raise UserError(f"{uri} names the repo type and revision: drop --repo-type and --revision")
    path = parsed.path_in_repo + ("/" if parsed.path_in_repo and uri.endswith("/") else "")
    if path and filenames:
        raise UserError(f"{uri} names a file already: drop FILENAMES")
    if parsed.is_bucket:
        raise UserError(f"{uri} is a bucket: vlhub downloads models only")
    return parsed.id, parsed.type, parsed.revision, [path] if path else filenames


def _say(text: str) -> None:
    stderr.print(text, markup=False, soft_wrap=True)


@dataclass(frozen=True)
class Fetched:
    """A finished download: where it is, what it is, how much of it came now."""

    path: Path  # the snapshot (or --local-dir) directory, or the one file named
    ref: RepoRef
    commit: str
    files: int
    total_bytes: int
    downloaded_bytes: int

    def to_json(self) -> dict:
        """As `vlhub download --json` prints it."""
        return {"path": str(self.path), "model": self.ref.model, "repo": self.ref.repo_id, "source": self.ref.source,
                "revision": self.ref.revision, "commit": self.commit, "files": self.files,
                "total_bytes": self.total_bytes, "downloaded_bytes": self.downloaded_bytes, "verified": True}


def fetch_model(model: str, *, source: str = "huggingface", revision: str | None = None,
                options: DownloadOptions = EVERYTHING, endpoint: str | None = None,
                quiet: bool = False) -> Fetched:
    """Download with its progress on stderr (`byte_progress`), unless `quiet`; every file checked against its listed
    hash."""
    def waiting(holder: str) -> None:
        _say(f"waiting for another download of {model} to finish ({holder})")

    options = replace(options, on_retry=_say)
    started = time.monotonic()
    with open_download(model, source=source, revision=revision, options=options, endpoint=endpoint,
                       on_wait=waiting) as job:
        total = sum(f.size for f in job.files)
        unchecked = job.unchecked
        work = job.missing_bytes + sum(f.size for f in unchecked)  # bytes received, and bytes there to hash
        if not work or quiet:
            path = job.fetch()
        else:  # a bar on a terminal, else a line as the first bytes come and one at the end
            contents = {u.etag for u in unchecked}  # files of equal content are hashed once, counted each
            there = sum(1 for f in job.files if f.etag in contents)
            what = (f"downloading {job.ref} ({plural(len(job.files), 'file')})" if job.missing_bytes else
                    f"checking {job.ref} ({plural(there, 'file')} already there)")
            with byte_progress(what, work) as advance:
                path = job.fetch(on_bytes=advance)
    if not quiet:
        seconds = time.monotonic() - started
        _say(f"{job.ref}: {plural(len(job.files), 'file')}, {format_size(total)}, each checked against its listed hash "
             f"({format_size(job.downloaded_bytes)} downloaded now, {seconds:.1f} s)")
    return Fetched(Path(path), job.ref, job.commit, len(job.files), total, job.downloaded_bytes)


def _dry_run(model: str, *, source: str, revision: str | None, options: DownloadOptions, endpoint: str | None,
             as_json: bool, quiet: bool) -> None:
    """What `fetch_model` would download, as `hf download --dry-run` lists it; nothing is written."""
    with open_download(model, source=source, revision=revision, options=options, endpoint=endpoint) as job:
        planned = [(file, job.will_download(file)) for file in sorted(job.files, key=lambda f: f.path)]
    fetched = [file for file, will in planned if will]
    size = sum(file.size for file in fetched)
    if as_json:
        print_json({"dry_run": True, "repo": job.ref.repo_id, "commit": job.commit, "will_download": len(fetched),
                    "files": [{"file": f.path, "size_bytes": f.size, "will_download": will} for f, will in planned],
                    "total_bytes": size})
        return
    if quiet:
        for file in fetched:
            stdout.print(escape(file.path), soft_wrap=True)
        return
    _show_dry_run(job, planned, size)


def _show_dry_run(job: Download, planned: list[tuple[RemoteFile, bool]], size: int) -> None:
    fetched = sum(1 for _, will in planned if will)
    stdout.print(f"{escape('[dry-run]')} {escape(str(job.ref))} ({job.commit[:12]}): would download "
                 f"{plural(fetched, 'file')} of {len(planned)}, {format_size(size)}", soft_wrap=True)
    width = max(len(file.path) for file, _ in planned)
    for file, will in planned:
        stdout.print(f"  {escape(file.path):<{width}}  {format_size(file.size) if will else '- (there)':>10}",
                     soft_wrap=True)


def download_for(spec: ModelSpec) -> Path:
    """A catalog model that is not on this machine yet, downloaded (what `vlhub convert MODEL` needs first)."""
    _say(f"{spec.name} is not in the cache: downloading {spec.hf_repo} first")
    return fetch_model(spec.name).path
