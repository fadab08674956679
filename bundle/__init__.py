"""The bundle: the torch-free contract between `export/` (which writes it) and `serving/` (which reads it).

- `bundle.format`: format version, file names, graph input/output names, MODES, VARIANTS, `term_names`.
- `bundle.manifest`: `bundle.json` as pydantic models, `read_manifest`.
- `bundle.validate`: `load_bundle(dir)` -> (Manifest, BundlePaths), or one `BundleError` listing every problem.
- `bundle.checksums`: `file_sha256`.
- `bundle.patches`: patch deletion on preprocessed pixels (`fill_patches`) and the total-effect map's rows and scores.
- `bundle.atlas`: the optional feature atlas (`AtlasInfo` in the manifest, `AtlasIndex` = atlas/atlas.json, array specs).
The format is described in docs/bundle.md.
"""
from .atlas import AtlasIndex, AtlasInfo
from .checksums import file_sha256
from .format import (
    CORE_OUTPUTS,
    FORMAT_VERSION,
    EDIT_INPUTS,
    IMAGE_EXTENSIONS,
    INTERVENE_FILE,
    INTERVENE_INPUTS,
    INTERVENE_MODES,
    INTERVENE_OUTPUTS,
    MANIFEST,
    MODEL_INPUTS,
    MODEL_OUTPUTS,
    MODES,
    SPATIAL_OUTPUTS,
    SUPPORTED_FORMAT_VERSIONS,
    TEXT_INPUTS,
    TEXT_OUTPUTS,
    VARIANTS,
    model_outputs,
    term_names,
)
from .manifest import BundleError, InterveneSpec, Manifest, PatchSpec, PreprocessSpec, SpatialSpec, read_manifest
from .validate import BundlePaths, load_bundle

__all__ = [
    "CORE_OUTPUTS", "EDIT_INPUTS", "FORMAT_VERSION", "IMAGE_EXTENSIONS", "INTERVENE_FILE", "INTERVENE_INPUTS", "INTERVENE_MODES",
    "INTERVENE_OUTPUTS", "InterveneSpec", "MANIFEST", "MODEL_INPUTS", "MODEL_OUTPUTS", "MODES",
    "SPATIAL_OUTPUTS", "SUPPORTED_FORMAT_VERSIONS", "TEXT_INPUTS", "TEXT_OUTPUTS", "VARIANTS", "AtlasIndex", "AtlasInfo",
    "BundleError", "BundlePaths", "Manifest", "PatchSpec", "PreprocessSpec", "SpatialSpec", "file_sha256", "load_bundle",
    "model_outputs", "read_manifest", "term_names",
]
