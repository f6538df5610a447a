"""`capray submit --url URL PHOTOS_DIR OUT_DIR`: one person's photos to a capray endpoint, protected ones back.

Exit codes: 0 every protected photo and summary.json saved; 1 the job failed, timed out, or the server
failed unexpectedly (a rerun may work); 2 usage: nothing to send, a bad URL or folder, or a request the
server refuses as sent (too many photos, a bad key, a bad --set…), with the reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from capray.exit_codes import EXIT_FAILED, EXIT_OK, EXIT_USAGE

PHOTO_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".heic", ".heif", ".bmp", ".tif", ".tiff"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("The API key comes from $CAPRAY_API_KEY (none: no Authorization header, for a keyless "
                     "server on loopback). The photos stay yours: the job is deleted from the server once "
                     "they are saved, unless --keep-on-server.")
    parser.add_argument("photos_dir", metavar="PHOTOS_DIR",
                        help=f"one person's photos: the files directly in it with an image suffix "
                             f"({' '.join(sorted(PHOTO_SUFFIXES))}; not recursive, hidden files skipped)")
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="where <name>.<format> and summary.json are written (not PHOTOS_DIR)")
    parser.add_argument("--url", required=True, help="the endpoint root, e.g. http://127.0.0.1:8000 "
                                                     "(with its route prefix, if any)")
    parser.add_argument("--identity", help="the person's name, which seeds the protection (default: "
                                           "PHOTOS_DIR's name)")
    parser.add_argument("--format", choices=["png", "webp"], help="protected photos' format (lossless either "
                                                                  "way; default: the server's output.format)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting the server lets requests set, e.g. --set attack.pgd_steps=4 "
                             "(repeatable; values parsed as YAML)")
    parser.add_argument("--keep-on-server", action="store_true",
                        help="leave the job (uploads and results) on the server until it expires")
    parser.add_argument("--timeout", type=float, metavar="S",
                        help="give up waiting after S seconds (default: an hour); the job is then deleted unless "
                             "--keep-on-server")


def make_client(url: str):
    """The client `run` talks through (tests substitute one on an httpx.MockTransport)."""
    from capray.client.api import Client

    return Client(url)


def find_photos(photos_dir: Path) -> list[Path]:
    """The photos directly in `photos_dir`, sorted by name (macOS `._*` and other hidden files left out)."""
    return sorted(p for p in photos_dir.iterdir()
                  if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES and not p.name.startswith("."))


def request_options(args: argparse.Namespace) -> dict:
    from capray.config import deep_merge, parse_set

    return deep_merge(parse_set(args.set), {"output": {"format": args.format}} if args.format else {})


def check_dirs(photos_dir: Path, out_dir: Path) -> str | None:
    """Why these folders cannot work, or None."""
    if not photos_dir.is_dir():
        return f"PHOTOS_DIR {photos_dir} is not a folder"
    if out_dir.exists() and not out_dir.is_dir():
        return f"OUT_DIR {out_dir} exists and is not a folder"
    if out_dir.resolve() == photos_dir.resolve():
        return "OUT_DIR is PHOTOS_DIR: the protected photos would overwrite the originals"
    return None


def run(args: argparse.Namespace) -> int:
    import yaml

    from capray.client.api import check_url
    from capray.errors import describe, report

    photos_dir, out_dir = Path(args.photos_dir), Path(args.out_dir)
    try:
        check_url(args.url)
        options = request_options(args)
    except (ValueError, yaml.YAMLError) as exc:
        report("submit", args, describe(exc))
        return EXIT_USAGE
    problem = check_dirs(photos_dir, out_dir)
    photos = find_photos(photos_dir) if problem is None else []
    if problem is None and not photos:
        problem = f"no photos in {photos_dir} (looked for {', '.join(sorted(PHOTO_SUFFIXES))})"
    if problem is not None:
        report("submit", args, problem)
        return EXIT_USAGE
    identity = args.identity or photos_dir.resolve().name or "user"
    with make_client(args.url) as client:
        return Submission(client, args).run(photos, identity, options, out_dir)


class Submission:
    """One `capray submit`: which failures are the user's to fix (2) and which a rerun may fix (1), and when
    the server's copy of the photos goes (once saved, or once there is nothing left to save)."""

    def __init__(self, client, args: argparse.Namespace):
        self.client, self.args, self.job_id = client, args, None
        self.last_progress = None

    def run(self, photos: list[Path], identity: str, options: dict, out_dir: Path) -> int:
        from capray.client.errors import CaprayError, JobFailed, WaitTimeout

        try:
            job = self.client.submit(photos, identity, options)
            self.job_id = job.job_id
            say(f"submitted {len(photos)} photos of {identity!r} as job {job.job_id}"
                + (" (the server already had it)" if job.replayed else ""))
            status = self.client.wait(job.job_id, timeout=self.args.timeout, on_progress=self.progress)
        except (JobFailed, WaitTimeout, KeyboardInterrupt) as exc:
            self.forget()  # nothing will be saved: the uploads need not stay
            if isinstance(exc, KeyboardInterrupt):
                raise
            return self.fail(EXIT_FAILED, str(exc))
        except CaprayError as exc:
            return self.fail(self.exit_code(exc), self.explain(exc))
        try:
            saved = self.save(status, out_dir)
        except (CaprayError, OSError) as exc:  # the job stays: its photos were not saved
            code = self.exit_code(exc) if isinstance(exc, CaprayError) else EXIT_FAILED
            return self.fail(code, f"{self.explain(exc)}; job {self.job_id} kept on the server")
        self.forget()
        print(f"RESULT submit job={self.job_id} photos={saved} ok=true out={out_dir}", flush=True)
        return EXIT_OK

    def save(self, status: dict, out_dir: Path) -> int:
        from capray.client.results import ProtectResult

        photos = self.client.download(self.job_id, status)
        record = {k: v for k, v in (status.get("result") or {}).items() if k != "photos"}
        paths = ProtectResult(self.job_id, photos, record, status).save(out_dir)
        say(f"saved {len(paths)} protected photos and summary.json in {out_dir}")
        return len(paths)

    def progress(self, status: dict) -> None:
        steps = status.get("progress") or {}
        shown = (status.get("status"), steps.get("steps_done"), steps.get("steps_total"))
        if shown != self.last_progress and status.get("status") == "pending":
            done, total = shown[1:]
            say(f"job {self.job_id}: pending" + (f", step {done}/{total}" if total else ""))
        self.last_progress = shown

    def forget(self) -> None:
        """Delete the job from the server, unless --keep-on-server; a failure here only warns."""
        from capray.client.errors import CaprayError, NotFound

        if self.job_id is None or self.args.keep_on_server:
            return
        try:
            self.client.delete(self.job_id)
            say(f"job {self.job_id} deleted from the server")
        except NotFound:
            pass
        except CaprayError as exc:
            say(f"could not delete job {self.job_id} from the server ({exc}); it expires there on its own")

    def exit_code(self, exc: Exception) -> int:
        """2 for a refusal of what the user sent, of the key, or a URL that reaches no server; 1 otherwise
        (a busy server, a 5xx, a job that went missing after it was accepted)."""
        from capray.client.errors import ApiError, AuthenticationError, PermissionDenied, ServerBusy, TransportError

        if isinstance(exc, AuthenticationError | PermissionDenied):
            return EXIT_USAGE
        if self.job_id is not None or isinstance(exc, ServerBusy):
            return EXIT_FAILED
        if isinstance(exc, ApiError):
            return EXIT_USAGE if 400 <= exc.status < 500 else EXIT_FAILED
        return EXIT_USAGE if isinstance(exc, TransportError) else EXIT_FAILED  # nothing was sent: no server there

    def explain(self, exc: Exception) -> str:
        from capray.client.errors import AuthenticationError, NotFound

        if isinstance(exc, AuthenticationError):
            hint = "check $CAPRAY_API_KEY" if self.client.has_key else "set $CAPRAY_API_KEY to your key"
            return f"{exc} ({hint})"
        if isinstance(exc, NotFound) and self.job_id is None:
            return f"{exc} (is --url the endpoint root, with its route prefix?)"
        return str(exc)

    def fail(self, code: int, message: str) -> int:
        from capray.errors import report

        report("submit", self.args, message)
        if self.job_id is not None:
            print(f"RESULT submit job={self.job_id} photos=0 ok=false out={self.args.out_dir}", flush=True)
        return code


def say(line: str) -> None:
    """A progress line: stderr, so stdout keeps only the RESULT line."""
    print(line, file=sys.stderr, flush=True)
