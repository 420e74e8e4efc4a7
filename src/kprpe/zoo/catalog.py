"""The published checkpoints kprpe knows by name, as data: what each is, what its authors report, and under
which terms its training data was released.

Every number is copied from the source named in ``SOURCES`` (no number is ours); a field we could not confirm
is left empty and says so. ``kprpe models --zoo`` prints this table; docs/models.md shows it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ZooEntry", "CATALOG", "DEFAULT_ALIGNER_WEIGHTS", "SOURCES", "LICENCES", "METRICS", "find_entry"]

SOURCES = {
    "cvlface-readme": (
        "CVLface README, model table (github.com/mk-minchul/CVLface, commit "
        "d3d09c93e53c5d5db9ec5c5fa96e5d77fe7a78d8; "
        "the same numbers are in cvlface/pretrained_models/README.md)"
    ),
    "kprpe-model-card": (
        "model card of minchul/cvlface_adaface_vit_base_kprpe_webface4m (it loads "
        "minchul/cvlface_DFA_mobilenet "
        "as the aligner for KP-RPE keypoints)"
    ),
}

# The aligner every published KP-RPE weight was trained and evaluated with (the default of --aligner dfa).
DEFAULT_ALIGNER_WEIGHTS = "minchul/cvlface_DFA_mobilenet"

# Column names exactly as in the source table (CPFLW is the source's spelling of CPLFW; IJB columns are TAR at
# the FAR the source labels "@0.01"; TinyFace columns are rank-1 / rank-5 identification accuracy).
METRICS = (
    "AVG",
    "LFW",
    "CPFLW",
    "CFPFP",
    "CALFW",
    "AGEDB",
    "IJBB@0.01",
    "IJBC@0.01",
    "TinyFace R1",
    "TinyFace R5",
)

LICENCES = {
    "WebFace4M": (
        "subset of WebFace260M: academic research only, no commercial use, no redistribution without "
        "permission "
        "(www.face-benchmark.org/download.html)"
    ),
    "WebFace12M": (
        "subset of WebFace260M: academic research only, no commercial use, no redistribution without "
        "permission "
        "(www.face-benchmark.org/download.html)"
    ),
    "MS1MV2": (
        "derived from MS-Celeb-1M, which Microsoft released for non-commercial research and withdrew in 2019 "
        "(AIAAIC repository entry on MS-Celeb-1M)"
    ),
    "MS1MV3": (
        "derived from MS-Celeb-1M, which Microsoft released for non-commercial research and withdrew in 2019 "
        "(AIAAIC repository entry on MS-Celeb-1M)"
    ),
    "CASIA-WebFace": (
        "terms not confirmed by the sources checked: read the dataset's own terms before any use"
    ),
    "VGGFace2": "terms not confirmed by the sources checked: read the dataset's own terms before any use",
    "": "training data not stated in the sources checked",
}
COMMON_TERMS = (
    "CVLface code is MIT; the model cards ask users to cite the paper and follow the licence of the training "
    "dataset"
)


@dataclass(frozen=True)
class ZooEntry:
    """One published checkpoint. ``loader`` names the kprpe code that reads it: ``vit`` (kprpe.load_official),
    ``iresnet`` (IResNet backbones) or ``dfa`` (kprpe.load_aligner)."""

    repo_id: str
    kind: str  # "recognition" or "aligner"
    architecture: str
    loss: str
    training_data: str
    loader: str
    reported: dict[str, float] = field(default_factory=dict)
    source: str = ""
    note: str = ""

    @property
    def licence(self) -> str:
        return LICENCES.get(self.training_data, LICENCES["CASIA-WebFace"])

    def to_dict(self) -> dict:
        return dict(
            repo_id=self.repo_id,
            kind=self.kind,
            architecture=self.architecture,
            loss=self.loss,
            training_data=self.training_data,
            loader=self.loader,
            reported=dict(self.reported),
            source=SOURCES.get(self.source, self.source),
            licence=self.licence,
            terms=COMMON_TERMS,
            note=self.note,
        )


def _scores(*values: float) -> dict[str, float]:
    if len(values) != len(METRICS):
        raise ValueError(f"expected {len(METRICS)} reported values, got {len(values)}")
    return dict(zip(METRICS, values, strict=True))


def _recognition(name, architecture, loss, data, loader, *values, note=""):
    return ZooEntry(
        f"minchul/{name}",
        "recognition",
        architecture,
        loss,
        data,
        loader,
        _scores(*values),
        "cvlface-readme",
        note,
    )


_VIT_KPRPE = "ViT-Base + KP-RPE (official KP-RPE model; keypoints from the DFA aligner)"
CATALOG: tuple[ZooEntry, ...] = (
    _recognition(
        "cvlface_adaface_vit_base_kprpe_webface12m",
        _VIT_KPRPE,
        "AdaFace",
        "WebFace12M",
        "vit",
        93.13,
        99.82,
        95.65,
        99.30,
        95.93,
        98.10,
        96.55,
        97.82,
        76.10,
        78.92,
        note="cvlface/pretrained_models/README.md at the same commit still says 'To be released on Aug.'",
    ),
    _recognition(
        "cvlface_adaface_vit_base_kprpe_webface4m",
        _VIT_KPRPE,
        "AdaFace",
        "WebFace4M",
        "vit",
        92.76,
        99.83,
        95.40,
        99.01,
        96.00,
        97.67,
        95.56,
        97.13,
        75.75,
        78.49,
    ),
    _recognition(
        "cvlface_adaface_vit_base_webface4m",
        "ViT-Base",
        "AdaFace",
        "WebFace4M",
        "vit",
        92.48,
        99.80,
        94.97,
        98.94,
        96.03,
        97.48,
        95.60,
        97.14,
        74.79,
        77.58,
    ),
    _recognition(
        "cvlface_adaface_ir101_webface12m",
        "IR-101",
        "AdaFace",
        "WebFace12M",
        "iresnet",
        92.13,
        99.82,
        94.57,
        99.24,
        96.12,
        98.00,
        96.46,
        97.72,
        72.42,
        74.81,
    ),
    _recognition(
        "cvlface_adaface_ir101_webface4m",
        "IR-101",
        "AdaFace",
        "WebFace4M",
        "iresnet",
        91.98,
        99.83,
        94.63,
        99.27,
        96.05,
        97.90,
        96.10,
        97.46,
        72.13,
        74.49,
    ),
    _recognition(
        "cvlface_arcface_ir101_webface4m",
        "IR-101",
        "ArcFace",
        "WebFace4M",
        "iresnet",
        91.76,
        99.78,
        94.35,
        99.21,
        96.00,
        97.95,
        95.83,
        97.30,
        71.03,
        74.41,
    ),
    _recognition(
        "cvlface_adaface_ir101_ms1mv3",
        "IR-101",
        "AdaFace",
        "MS1MV3",
        "iresnet",
        90.99,
        99.83,
        93.92,
        99.09,
        96.02,
        98.18,
        95.82,
        97.05,
        67.95,
        71.03,
    ),
    _recognition(
        "cvlface_adaface_ir101_ms1mv2",
        "IR-101",
        "AdaFace",
        "MS1MV2",
        "iresnet",
        90.90,
        99.80,
        93.53,
        98.61,
        96.12,
        98.05,
        95.59,
        96.81,
        68.11,
        71.49,
    ),
    _recognition(
        "cvlface_adaface_ir50_ms1mv2",
        "IR-50",
        "AdaFace",
        "MS1MV2",
        "iresnet",
        89.96,
        99.85,
        92.85,
        98.09,
        96.07,
        97.85,
        94.86,
        96.20,
        64.99,
        68.88,
    ),
    _recognition(
        "cvlface_adaface_ir50_webface4m",
        "IR-50",
        "AdaFace",
        "WebFace4M",
        "iresnet",
        91.48,
        99.78,
        94.17,
        98.99,
        95.98,
        97.78,
        95.49,
        97.01,
        70.20,
        73.93,
    ),
    _recognition(
        "cvlface_adaface_ir50_casia",
        "IR-50",
        "AdaFace",
        "CASIA-WebFace",
        "iresnet",
        77.43,
        99.37,
        90.02,
        97.04,
        93.43,
        94.40,
        46.04,
        52.97,
        59.44,
        64.14,
    ),
    _recognition(
        "cvlface_adaface_ir18_webface4m",
        "IR-18",
        "AdaFace",
        "WebFace4M",
        "iresnet",
        89.55,
        99.58,
        92.28,
        97.80,
        95.52,
        96.48,
        92.75,
        94.79,
        66.07,
        70.71,
    ),
    _recognition(
        "cvlface_adaface_ir18_vgg2",
        "IR-18",
        "AdaFace",
        "VGGFace2",
        "iresnet",
        88.12,
        99.53,
        91.73,
        97.64,
        93.90,
        94.07,
        90.07,
        92.40,
        64.62,
        69.15,
    ),
    _recognition(
        "cvlface_adaface_ir18_casia",
        "IR-18",
        "AdaFace",
        "CASIA-WebFace",
        "iresnet",
        72.40,
        99.22,
        87.00,
        94.93,
        92.65,
        92.68,
        30.36,
        37.10,
        56.20,
        61.43,
    ),
    ZooEntry(
        "minchul/cvlface_DFA_mobilenet",
        "aligner",
        "DFA (Differentiable Face Aligner): RetinaFace-MobileNet0.25 + mixer aggregator, 5 keypoints",
        "",
        "",
        "dfa",
        {},
        "kprpe-model-card",
        note="no accuracy of its own is reported in the sources checked; training data not stated there",
    ),
)

_BY_ID = {entry.repo_id.lower(): entry for entry in CATALOG}


def find_entry(repo_id: str) -> ZooEntry | None:
    """The catalog entry of ``repo_id`` (case-insensitive, like the Hub), or None for an uncatalogued repo."""
    return _BY_ID.get(repo_id.split("@", 1)[0].lower())
