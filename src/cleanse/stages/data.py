"""The ``source`` and ``stage`` stages: the data files' content digests, and the staged splits."""

from __future__ import annotations

from pathlib import Path

from cleanse.config import Params
from cleanse.errors import ArtifactError
from cleanse.stages.common import locked, source_records, track
from cleanse.stages.fingerprints import content_digest, is_local_file_source, stage_fingerprint
from cleanse.storage import Layout, read_json, write_json, write_table


@locked
def run_source(params: Params, layout: Layout) -> tuple[Path, Path]:
    """Record the content digests of the data file and the probe file (:func:`content_digest`) in
    ``data/source.json`` and ``data/probes_source.json``, which DVC's ``stage`` and
    ``query``/``score``/``retrain`` stages depend on: ``dvc.yaml`` cannot name ``data.source`` as a
    dependency (a built-in ``sklearn:`` source is no file), so this always-run stage turns a
    replaced file into a changed dependency, and leaves the records untouched otherwise (the
    stages after it are skipped). A missing file is refused here, as the stage would."""
    from cleanse.storage import fetch_input

    probe_file = params.query.path if params.query.kind == "file" else None  # else probes come from the data
    entries = []
    for source, what in ((params.data.source, "data.source"), (probe_file, "query.path")):
        digest = content_digest(source, what) if source else None
        if digest is None and source and is_local_file_source(source):
            fetch_input(source)  # a missing file: the stage's own "file not found" / "not a file" error
        entries.append({"source": source, "digest": digest})
    data_record, probes_record = source_records(layout)
    for record, entry in zip((data_record, probes_record), entries, strict=True):
        # Rewritten only when changed, so an unchanged source leaves DVC nothing to rerun.
        try:
            unchanged = read_json(record) == entry
        except (ValueError, ArtifactError):
            unchanged = False
        if not unchanged:
            write_json(entry, record)
    layout.publish()
    return data_record, probes_record


@locked
def run_stage(params: Params, layout: Layout) -> Path:
    """Write ``data/staged/{train,val,test}.parquet`` and ``meta.json``."""
    from cleanse import families
    from cleanse.data.stage import stage_data

    staged = stage_data(params)
    families.get(params.family).check_model(params, staged.meta)  # the model must fit the data before anything is written
    layout.ensure_root()
    for name in ("train", "val", "test"):
        write_table(getattr(staged, name).to_frame(), layout.split(name))
    write_json({**staged.meta.to_json(), "fingerprint": stage_fingerprint(params),
                "n": {name: len(getattr(staged, name)) for name in ("train", "val", "test")}}, layout.staged_meta)
    track(params, layout, "stage")
    layout.publish()
    return layout.staged
