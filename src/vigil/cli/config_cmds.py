"""``vigil check [DIR]`` and ``vigil apply [DIR]``.

``check`` validates every file and key, then runs each external script's
``validate`` entry point on this node. ``apply`` checks, then writes the whole
configuration to the store in one transaction: all or nothing. A package that is
running cannot be removed by ``apply`` (halt it first). ``apply`` holds the admin
lock, so two applies wait for each other; a concurrent change of the applied
configuration by anything else still makes ``apply`` fail instead of interleaving.
Removing packages runs the ``pre_delete`` / ``post_delete`` hooks around the write.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import click

from vigil import flags, hooks
from vigil.cli.context import CliContext
from vigil.cli.params import SECONDS, SafePath
from vigil.config import CheckReport, ConfigTree, load_tree
from vigil.errors import ConfigError, Conflict, VigilError, one_line
from vigil.keys import Keys
from vigil.locks import AdminLock
from vigil.model import ACTIVE_STATES
from vigil.scripts.runner import run_script
from vigil.snapshot import Snapshot, encode, encode_bundle, read_snapshot
from vigil.store import Compare, Delete, Op, Put, Store, open_store

VALIDATE_TIMEOUT_CAP = 120.0


async def run_validations(tree: ConfigTree, node: str, report: CheckReport) -> None:
    for name, spec in tree.packages.items():
        where = tree.files[name]
        env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
        env.update(spec.env)
        env.update(
            VIGIL_CLUSTER=tree.cluster.name,
            VIGIL_PACKAGE=name,
            VIGIL_NODE=node,
            VIGIL_ACTION="validate",
        )
        timeout = min(spec.run_script_timeout or VALIDATE_TIMEOUT_CAP, VALIDATE_TIMEOUT_CAP)
        for key in ("external_pre_script", "external_script"):
            for i, ref in enumerate(getattr(spec, key)):
                if any(e.where.startswith(f"{where}: {key}[{i}]") for e in report.errors):
                    continue
                with tempfile.NamedTemporaryFile(prefix="vigil-validate-") as out:
                    res = await run_script(
                        ref, "validate", env=env, timeout=timeout, log_path=out.name
                    )
                    said = _last_line(out.name)
                if res.exit_code != 0 or res.timed_out:
                    why = res.describe()
                    if res.error is None and said:
                        why += f": {said}"  # the script's own explanation
                    report.errors.append(ConfigError(f"{where}: {key}[{i}]", one_line(why)))


def _last_line(path: str, limit: int = 200) -> str:
    """The last non-empty line a script printed (its explanation), shortened."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 4096))
        lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    last = next((ln for ln in reversed(lines) if ln), "")
    return one_line(last if len(last) <= limit else last[: limit - 3] + "...")


def report_errors(report: CheckReport, *, every: bool = False, suffix: str = "") -> None:
    """Print the errors of ``report`` on stderr, one line per file: ``FILE: KEY: WHAT``
    and the file's other errors after it (``; KEY: WHAT``); with ``every``, one line
    per error."""
    by_file: dict[str, list[ConfigError]] = {}
    for e in report.errors:
        by_file.setdefault(e.where.partition(": ")[0], []).append(e)
    lines = []
    for file, errors in by_file.items():
        if every:
            lines += [f"vigil: error: {e}" for e in errors]
            continue
        rest = [str(e).removeprefix(f"{file}: ") for e in errors[1:]]
        lines.append("; ".join([f"vigil: error: {errors[0]}", *rest]))
    lines[-1] += suffix
    for line in lines:
        click.echo(one_line(line), err=True)


def _check(config_dir: Path, node: str, *, every: bool = False, suffix: str = "") -> ConfigTree:
    report = CheckReport()
    tree = load_tree(config_dir, report)
    if tree is not None:  # also beside other errors: report every broken script at once
        asyncio.run(run_validations(tree, node, report))
    if not report.ok or tree is None:
        report_errors(report, every=every, suffix=suffix)
        raise _Rejected()
    for w in report.warnings:
        click.echo(one_line(f"warning: {w}"), err=True)
    return tree


class _Rejected(VigilError):
    """The configuration has errors; they are printed already (one line per file)."""

    exit_code = 2


def _dir_arg(obj: CliContext, directory: Path | None) -> Path:
    return (directory or obj.config_dir).resolve()


@click.command()
@click.argument("directory", required=False, type=SafePath(path_type=Path))
@click.option("--all", "every", is_flag=True, help="One line per error (default: per file).")
@click.pass_obj
def check(obj: CliContext, directory: Path | None, every: bool) -> None:
    """Validate a configuration directory and run the scripts' validate entry points."""
    config_dir = _dir_arg(obj, directory)
    tree = _check(config_dir, obj.node, every=every)
    n = len(tree.packages)
    click.echo(f"{config_dir}: valid (cluster {tree.cluster.name}, {n} package{'s' * (n != 1)})")


BUNDLE = 100  # package specs per store key


def check_removals(snap: Snapshot, tree: ConfigTree) -> list[str]:
    """The packages ``tree`` removes; a ConfigError if one of them still runs."""
    removed = sorted(set(snap.packages) - set(tree.packages))
    for name in removed:
        st = snap.status.get(name)
        if name in snap.owners or (st is not None and st.state in ACTIVE_STATES):
            raise ConfigError(
                f"{tree.directory}/packages",
                f"package {name!r} is {st.state.value if st else 'running'} "
                f"on {snap.owners.get(name, st.node if st else '?')}: halt it before "
                "removing it from the configuration; nothing applied",
            )
    return removed


async def apply_tree(store: Store, tree: ConfigTree) -> list[str]:
    """Write ``tree`` in one transaction. Returns notes for the operator.

    The package specs go in bundles of ``BUNDLE`` per key, so that even thousands of
    packages are one transaction within etcd's limit of operations per transaction.
    Every bundle key read is guarded by its revision: a concurrent apply makes this
    one fail, never a mix of the two.
    """
    keys = Keys(tree.cluster.name)
    snap = await read_snapshot(store, keys)
    notes: list[str] = []
    old_bundles = sorted(k for k in snap.raw_revisions if k.startswith(keys.config_bundles))
    compares = [
        Compare.mod_revision(k, snap.raw_revisions.get(k, 0))
        for k in [keys.config_cluster, *old_bundles]
    ]
    ops: list[Op] = [Put(keys.config_cluster, encode(tree.cluster))]
    names = sorted(tree.packages)
    chunks = [names[i : i + BUNDLE] for i in range(0, len(names), BUNDLE)]
    for i, chunk in enumerate(chunks):
        ops.append(Put(keys.config_bundle(i), encode_bundle([tree.packages[n] for n in chunk])))
    new_bundles = {keys.config_bundle(i) for i in range(len(chunks))}
    ops += [Delete(k) for k in old_bundles if k not in new_bundles]
    for name in check_removals(snap, tree):
        ops += [Delete(keys.admin(name)), Delete(keys.status(name)),
                Delete(keys.assignment(name))]  # fmt: skip
        notes.append(f"package {name}: removed")
    for name, spec in tree.packages.items():
        old = snap.packages.get(name)
        if old == spec:
            continue
        if old is None:
            notes.append(f"package {name}: added")
        elif name in snap.owners and snap.status_of(name).definition == spec.digest():
            notes.append(f"package {name}: changed back to the definition it runs with "
                         f"on {snap.owners[name]}")  # fmt: skip
        elif name in snap.owners:
            notes.append(f"package {name}: changed; running on {snap.owners[name]}, the change "
                         "takes effect when it next starts")  # fmt: skip
        else:
            notes.append(f"package {name}: changed")
    res = await store.txn(compares, ops)
    if not res.succeeded:
        raise Conflict("the applied configuration changed while applying; nothing applied, retry")
    return notes


async def apply_locked(
    store: Store, tree: ConfigTree, node: str, lock_timeout: float | None
) -> list[str]:
    """``apply_tree`` under the admin lock, with the delete hooks around removals."""
    keys = Keys(tree.cluster.name)
    async with AdminLock(store, keys, "apply", node, lock_timeout):
        snap = await read_snapshot(store, keys)
        removed = check_removals(snap, tree)
        if not removed or not hooks.configured(tree.cluster, "delete"):
            return await apply_tree(store, tree)
        notes: list[str] = []

        async def phase(name: str) -> None:
            for pkg in removed:
                for r in await hooks.run_phase(tree.cluster, node, name, package=pkg,
                                               config_dir=str(tree.directory)):  # fmt: skip
                    notes.append(("hook " if r.ok else "hook FAILED: ") + r.detail)

        await flags.create(store, keys, node, flags.pending("delete"), node)
        await phase("pre_delete")
        try:
            notes += await apply_tree(store, tree)
            for other in sorted(set(snap.nodes) - {node}):  # they run their post_delete
                await flags.create(store, keys, node, flags.pending("delete", other), node)
        finally:
            await phase("post_delete")
            await flags.remove(store, keys, node, flags.pending("delete"))
        return notes


@click.command()
@click.argument("directory", required=False, type=SafePath(path_type=Path))
@click.option("--lock-timeout", type=SECONDS, default=120.0, show_default=True,
              help="Seconds to wait for the admin lock.")  # fmt: skip
@click.pass_obj
def apply(obj: CliContext, directory: Path | None, lock_timeout: float) -> None:
    """Check a configuration directory, then write all of it to the store at once.

    Takes the cluster-wide admin lock, so two applies never interleave."""
    config_dir = _dir_arg(obj, directory)
    tree = _check(config_dir, obj.node, suffix="; nothing applied")

    async def go() -> list[str]:
        store = open_store(tree.cluster.store)
        try:
            return await apply_locked(store, tree, obj.node, lock_timeout)
        finally:
            await store.close()

    notes = asyncio.run(go())
    for note in notes:
        click.echo(note)
    click.echo(f"applied {config_dir} to cluster {tree.cluster.name} "
               f"({len(tree.packages)} packages)")  # fmt: skip
