"""Synthetic walkers: a deterministic, principled stand-in for a gait data set, in the OpenGait layout.

Each identity is a 3-D COCO-17 kinematic chain with its own gait: cycle period, hip/knee/arm amplitudes,
knee timing, harmonics, trunk lean, bob, sway and a left/right asymmetry. Body proportions vary only a little
between identities (2 %) and are hidden under per-sequence clothing thickness, so one frame's static shape
says little about who walks; the motion says most. Each sequence draws its nuisances: start phase, speed
(+-10 %), length, camera yaw (a discrete set of views), render scale, clothing thickness, occluding bars and
keypoint noise / dropout with confidences. Frames are rendered as filled capsules, then go through the same
pretreatment as real data (:mod:`kprpe.gait.pretreatment`) with the keypoints moved alongside.

``misalign``: after pretreatment each sequence is scaled and translated at random, keypoints following: the
gait counterpart of unaligned faces. Only plumbing and mechanism can be tested on this data; it says nothing
about accuracy on a real data set.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from types import SimpleNamespace

import numpy as np

from ..files import staged_folder, write_json
from .formats import NUM_JOINTS, dump_array_pickle
from .partition import GaitPartition, make_partition, write_partition
from .pretreatment import pretreat_frame_and_keypoints

__all__ = [
    "SyntheticConfig",
    "WalkerIdentity",
    "draw_identity",
    "render_walk",
    "walk_sequence",
    "make_synthetic",
    "SYNTHETIC_MARKER",
    "COCO17_NAMES",
]

SYNTHETIC_MARKER = ".kprpe-gait-synthetic"
COCO17_NAMES = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
CANVAS = (128, 112)  # render canvas (height, width): the "human crop" the pretreatment starts from


@dataclass(frozen=True)
class SyntheticConfig:
    """What :func:`make_synthetic` generates. Ranges are ``(low, high)``, drawn uniformly."""

    ids: int = 20
    sequences_per_id: int = 6
    frames: tuple[int, int] = (30, 60)
    views: tuple[int, ...] = (30, 60, 90, 120, 150)  # camera yaw in degrees; 90 = side view, 0 = frontal
    width: int = 44
    seed: int = 0
    misalign: bool = False
    misalign_scale: tuple[float, float] = (0.7, 1.0)
    misalign_shift: float = 0.15  # largest translation, as a fraction of the frame width / height
    occluder_probability: float = 0.25
    keypoint_noise: float = 0.4  # pixels of the render canvas, for a joint of confidence 1
    dropout: float = 0.05  # share of joints replaced by a low-confidence wild guess
    test_fraction: float = 0.5

    def __post_init__(self):
        if self.ids < 2 or self.sequences_per_id < 1:
            raise ValueError(
                f"need at least 2 ids and 1 sequence each, got {self.ids} x {self.sequences_per_id}"
            )
        if not 2 <= self.frames[0] <= self.frames[1]:
            raise ValueError(f"frames must be (low, high) with 2 <= low <= high, got {self.frames}")
        if not self.views or any(not 0 <= v <= 180 for v in self.views):
            raise ValueError(f"views are camera yaws in [0, 180] degrees, got {self.views}")
        if self.width not in (44, 64):
            raise ValueError(f"width must be 44 or 64, got {self.width}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test fraction must be in (0, 1), got {self.test_fraction}")
        if not 0 < self.misalign_scale[0] <= self.misalign_scale[1] or self.misalign_shift < 0:
            raise ValueError("misalign scale must be (low, high) with 0 < low <= high, and the shift >= 0")
        if not 0 <= self.dropout < 1 or not 0 <= self.occluder_probability <= 1 or self.keypoint_noise < 0:
            raise ValueError("dropout must be in [0, 1), occluder probability in [0, 1], noise >= 0")


@dataclass(frozen=True)
class WalkerIdentity:
    """One walker: body proportions (fractions of body height) and gait (angles in radians, period in
    frames)."""

    thigh: float
    shin: float
    torso: float
    neck: float
    head: float  # radius
    upper_arm: float
    forearm: float
    shoulder_half_width: float
    hip_half_width: float
    limb_radius: float
    period: float
    hip_amplitude: float
    hip_offset: float
    hip_harmonics: tuple[float, float, float, float]  # 2nd, 3rd amplitude (relative) and phases
    knee_rest: float
    knee_swing: float
    knee_phase: float
    knee_stance: float
    arm_amplitude: float
    elbow_rest: float
    elbow_swing: float
    lean: float
    bob: float
    sway: float
    asymmetry_phase: float
    asymmetry_gain: float


def draw_identity(rng: np.random.Generator) -> WalkerIdentity:
    """A walker: proportions near the human mean (2 % spread), gait parameters spread widely."""

    def near(mean: float) -> float:
        return float(mean * (1 + 0.02 * rng.standard_normal()))

    return WalkerIdentity(
        thigh=near(0.245),
        shin=near(0.245),
        torso=near(0.30),
        neck=near(0.10),
        head=near(0.062),
        upper_arm=near(0.17),
        forearm=near(0.16),
        shoulder_half_width=near(0.11),
        hip_half_width=near(0.08),
        limb_radius=near(0.034),
        period=float(rng.uniform(22, 36)),
        hip_amplitude=float(np.radians(rng.uniform(14, 30))),
        hip_offset=float(np.radians(rng.uniform(-4, 6))),
        hip_harmonics=(
            float(rng.uniform(0, 0.25)),
            float(rng.uniform(0, 0.15)),
            float(rng.uniform(0, 2 * np.pi)),
            float(rng.uniform(0, 2 * np.pi)),
        ),
        knee_rest=float(np.radians(rng.uniform(2, 12))),
        knee_swing=float(np.radians(rng.uniform(35, 65))),
        knee_phase=float(rng.uniform(0.4, 1.8)),
        knee_stance=float(np.radians(rng.uniform(0, 15))),
        arm_amplitude=float(np.radians(rng.uniform(5, 35))),
        elbow_rest=float(np.radians(rng.uniform(5, 35))),
        elbow_swing=float(np.radians(rng.uniform(0, 30))),
        lean=float(np.radians(rng.uniform(-2, 10))),
        bob=float(rng.uniform(0.004, 0.025)),
        sway=float(rng.uniform(0.0, 0.03)),
        asymmetry_phase=float(rng.uniform(-0.35, 0.35)),
        asymmetry_gain=float(rng.uniform(0.85, 1.15)),
    )


def _leg(w: WalkerIdentity, phase: np.ndarray, gain: float):
    """Hip flexion and knee flexion angles over ``phase`` (radians; 0 = hip passing vertical forward)."""
    a2, a3, p2, p3 = w.hip_harmonics
    hip = w.hip_offset + gain * w.hip_amplitude * (
        np.sin(phase) + a2 * np.sin(2 * phase + p2) + a3 * np.sin(3 * phase + p3)
    )
    swing = (0.5 * (1 + np.cos(phase - w.knee_phase))) ** 2
    stance = np.maximum(0.0, np.sin(phase + np.pi / 2 + w.knee_phase)) ** 3
    knee = w.knee_rest + gain * (w.knee_swing * swing + w.knee_stance * stance)
    return hip, knee


def _joints_3d(w: WalkerIdentity, phase: np.ndarray, amplitude: float) -> dict[str, np.ndarray]:
    """Joint positions ``[T, 3]`` (X forward, Y up, Z to the walker's left), ground at Y = 0."""
    t = phase.shape[0]
    gains = {"right": amplitude, "left": amplitude * w.asymmetry_gain}
    phases = {"right": phase, "left": phase + np.pi + w.asymmetry_phase}
    leg_length = w.thigh + w.shin
    pelvis = np.zeros((t, 3))
    pelvis[:, 1] = 0.97 * leg_length + w.bob * np.cos(2 * phase)
    pelvis[:, 2] = w.sway * np.sin(phase)
    up = np.stack([np.sin(w.lean) * np.ones(t), np.cos(w.lean) * np.ones(t), np.zeros(t)], axis=1)
    shoulder_mid = pelvis + w.torso * up
    joints: dict[str, np.ndarray] = {}
    for side, sign in (("left", 1.0), ("right", -1.0)):
        hip_angle, knee_angle = _leg(w, phases[side], gains[side])
        hip = pelvis + np.array([0.0, 0.0, sign * w.hip_half_width])
        thigh = np.stack([np.sin(hip_angle), -np.cos(hip_angle), np.zeros(t)], axis=1)
        knee = hip + w.thigh * thigh
        shin_angle = hip_angle - knee_angle
        ankle = knee + w.shin * np.stack([np.sin(shin_angle), -np.cos(shin_angle), np.zeros(t)], axis=1)
        # arms swing against the leg of the same side
        arm_angle = -w.arm_amplitude * gains[side] * np.sin(phases[side])
        shoulder = shoulder_mid + np.array([0.0, 0.0, sign * w.shoulder_half_width])
        elbow = shoulder + w.upper_arm * np.stack(
            [np.sin(arm_angle), -np.cos(arm_angle), np.zeros(t)], axis=1
        )
        fore = arm_angle + w.elbow_rest + w.elbow_swing * 0.5 * (1 + np.sin(phases[side] + np.pi))
        wrist = elbow + w.forearm * np.stack([np.sin(fore), -np.cos(fore), np.zeros(t)], axis=1)
        joints.update(
            {
                f"{side}_hip": hip,
                f"{side}_knee": knee,
                f"{side}_ankle": ankle,
                f"{side}_shoulder": shoulder,
                f"{side}_elbow": elbow,
                f"{side}_wrist": wrist,
            }
        )
    head = shoulder_mid + (w.neck + w.head) * up
    r = w.head
    joints["head"] = head
    joints["nose"] = head + np.array([0.55 * r, -0.1 * r, 0.0])
    for side, sign in (("left", 1.0), ("right", -1.0)):
        joints[f"{side}_eye"] = head + np.array([0.4 * r, 0.15 * r, sign * 0.3 * r])
        joints[f"{side}_ear"] = head + np.array([-0.05 * r, 0.05 * r, sign * 0.55 * r])
    return joints


def _capsules(w: WalkerIdentity, joints: dict[str, np.ndarray], thickness: float):
    """Segments ``(start [T, 3], end [T, 3], radius)`` whose union is the body."""
    limb = w.limb_radius * thickness
    pelvis = 0.5 * (joints["left_hip"] + joints["right_hip"])
    shoulder_mid = 0.5 * (joints["left_shoulder"] + joints["right_shoulder"])
    parts = [
        (pelvis, shoulder_mid, 1.9 * limb),
        (shoulder_mid, joints["head"], 0.9 * limb),
        (joints["head"], joints["head"], w.head),
    ]
    for side in ("left", "right"):
        forward = np.array([0.055, -0.015, 0.0])
        parts += [
            (joints[f"{side}_hip"], joints[f"{side}_knee"], 1.25 * limb),
            (joints[f"{side}_knee"], joints[f"{side}_ankle"], 1.0 * limb),
            (joints[f"{side}_ankle"], joints[f"{side}_ankle"] + forward, 0.8 * limb),
            (joints[f"{side}_hip"], joints[f"{side}_shoulder"], 1.6 * limb),
            (joints[f"{side}_shoulder"], joints[f"{side}_elbow"], 0.85 * limb),
            (joints[f"{side}_elbow"], joints[f"{side}_wrist"], 0.75 * limb),
        ]
    return parts


def _project(points: np.ndarray, yaw: float, scale: float, origin: tuple[float, float]) -> np.ndarray:
    """Orthographic camera at ``yaw`` (90 degrees: side view): ``[..., 3]`` -> canvas pixels ``[..., 2]``."""
    u = points[..., 0] * np.sin(yaw) + points[..., 2] * np.cos(yaw)
    return np.stack([origin[0] + scale * u, origin[1] - scale * points[..., 1]], axis=-1)


def _render(segments, yaw: float, scale: float, origin) -> np.ndarray:
    """Union of 2-D capsules (two discs and the quadrilateral between them), ``uint8 [T, H, W]`` in
    {0, 255}; drawn with OpenCV at 1/16 pixel precision (a per-pixel distance test is 10x slower)."""
    import cv2

    fraction = 16  # cv2's ``shift=4``: coordinates and radii in 1/16 pixel
    t = segments[0][0].shape[0]
    frames = np.zeros((t, *CANVAS), dtype=np.uint8)
    projected = []
    for start, end, radius in segments:
        a = _project(start, yaw, scale, origin)
        b = _project(end, yaw, scale, origin)
        direction = b - a
        length = np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-9)
        normal = np.stack([-direction[:, 1], direction[:, 0]], axis=1) / length * (radius * scale)
        quad = np.stack([a + normal, b + normal, b - normal, a - normal], axis=1)
        projected.append(
            (
                np.round(a * fraction).astype(np.int32),
                np.round(b * fraction).astype(np.int32),
                int(round(radius * scale * fraction)),
                np.round(quad * fraction).astype(np.int32),
            )
        )
    for i in range(t):
        frame = frames[i]
        for a, b, r, quad in projected:
            cv2.circle(frame, (int(a[i, 0]), int(a[i, 1])), r, 255, -1, cv2.LINE_8, 4)
            cv2.circle(frame, (int(b[i, 0]), int(b[i, 1])), r, 255, -1, cv2.LINE_8, 4)
            cv2.fillConvexPoly(frame, quad[i], 255, cv2.LINE_8, 4)
    return frames


def render_walk(identity: WalkerIdentity, rng: np.random.Generator, config: SyntheticConfig):
    """The raw frames of one sequence, as a data set ships them before pretreatment: ``(frames uint8
    [T, 128, 112] in {0, 255}, keypoints float [T, 17, 3] (x, y, confidence) in frame pixels, nuisances)``."""
    # posture varies from walk to walk (mood, a bag, shoes), so a frame's lean or arm bend is no fingerprint
    identity = replace(
        identity,
        lean=identity.lean + float(np.radians(rng.normal(0, 3))),
        elbow_rest=max(0.0, identity.elbow_rest + float(np.radians(rng.normal(0, 8)))),
        hip_offset=identity.hip_offset + float(np.radians(rng.normal(0, 2))),
        knee_rest=max(0.0, identity.knee_rest + float(np.radians(rng.normal(0, 3)))),
    )
    length = int(rng.integers(config.frames[0], config.frames[1] + 1))
    yaw_degrees = int(rng.choice(config.views))
    speed = float(rng.uniform(0.9, 1.1))
    phase0 = float(rng.uniform(0, 2 * np.pi))
    body_px = float(rng.uniform(84, 112))
    thickness = float(rng.uniform(0.85, 1.3))
    phase = phase0 + 2 * np.pi * speed * np.arange(length) / identity.period
    joints = _joints_3d(identity, phase, amplitude=speed**0.5)  # faster walkers stride a little further
    yaw = np.radians(yaw_degrees)
    origin = (CANVAS[1] / 2, CANVAS[0] - 6.0)
    frames = _render(_capsules(identity, joints, thickness), yaw, body_px, origin)
    keypoints = np.stack([_project(joints[name], yaw, body_px, origin) for name in COCO17_NAMES], axis=1)
    keypoints, confidence = _noisy_keypoints(keypoints, rng, config)

    occluded = np.zeros(frames.shape, dtype=bool)
    if rng.random() < config.occluder_probability:  # a bar (pole, shelf) the walker passes behind
        bar = int(rng.uniform(0.08, 0.2) * CANVAS[1])
        start, end = rng.uniform(-0.3, 1.3, size=2) * CANVAS[1]
        positions = np.linspace(start, end, length).astype(int)
        for i, x in enumerate(positions):
            occluded[i, :, max(x, 0) : max(x + bar, 0)] = True
        frames[occluded] = 0
        ix = np.clip(np.round(keypoints[..., 0]).astype(int), 0, CANVAS[1] - 1)
        iy = np.clip(np.round(keypoints[..., 1]).astype(int), 0, CANVAS[0] - 1)
        hidden = occluded[np.arange(length)[:, None], iy, ix]
        confidence[hidden] = rng.uniform(0.0, 0.3, size=int(hidden.sum()))

    nuisances = dict(
        view=yaw_degrees,
        speed=speed,
        phase=phase0,
        length=length,
        body_px=body_px,
        thickness=thickness,
        occluded=bool(occluded.any()),
    )
    return frames, np.concatenate([keypoints, confidence[..., None]], axis=2), nuisances


def walk_sequence(identity: WalkerIdentity, rng: np.random.Generator, config: SyntheticConfig):
    """One sequence of ``identity``: ``(sils uint8 [T, 64, width], pose float32 [T, 17, 3], nuisances)``.
    Pose is COCO-17 ``(x, y, confidence)`` in the pixels of the silhouette frames. The raw frames of
    :func:`render_walk` go through the pretreatment of real data; frames it drops are left out of both, so
    ``T`` can be below the drawn length."""
    frames, keypoints, nuisances = render_walk(identity, rng, config)
    sils, pose = [], []
    for frame, raw in zip(frames, keypoints, strict=True):
        result = pretreat_frame_and_keypoints(frame, raw, config.width)
        if result is not None:
            sils.append(result[0])
            pose.append(result[1])
    sils_array = np.stack(sils) if sils else np.zeros((0, 64, config.width), np.uint8)
    pose_array = np.stack(pose) if pose else np.zeros((0, NUM_JOINTS, 3), np.float32)
    if config.misalign and len(sils):
        sils_array, pose_array, warp = _misalign(sils_array, pose_array, rng, config)
        nuisances["misalign"] = warp
    return sils_array, pose_array.astype(np.float32), nuisances


def _noisy_keypoints(points: np.ndarray, rng: np.random.Generator, config: SyntheticConfig):
    """Detector-like keypoints: confidence per joint; noise grows as confidence falls; a ``dropout`` share of
    joints are wild guesses with confidence below 0.3."""
    shape = points.shape[:2]
    confidence = rng.uniform(0.55, 1.0, size=shape)
    noise = config.keypoint_noise * (1 + 3 * (1 - confidence))[..., None] * rng.standard_normal(points.shape)
    points = points + noise
    dropped = rng.random(shape) < config.dropout
    confidence[dropped] = rng.uniform(0.0, 0.3, size=int(dropped.sum()))
    points[dropped] += rng.normal(0, 0.08 * CANVAS[0], size=(int(dropped.sum()), 2))
    return points, confidence


def _misalign(sils: np.ndarray, pose: np.ndarray, rng: np.random.Generator, config: SyntheticConfig):
    """Scale about the frame centre and translate every frame of a sequence alike; keypoints follow."""
    import cv2

    height, width = sils.shape[1:]
    scale = float(rng.uniform(*config.misalign_scale))
    shift = rng.uniform(-config.misalign_shift, config.misalign_shift, size=2) * (width, height)
    centre = np.array([(width - 1) / 2, (height - 1) / 2])
    offset = centre * (1 - scale) + shift
    matrix = np.array([[scale, 0.0, offset[0]], [0.0, scale, offset[1]]])
    warped = np.stack([cv2.warpAffine(f, matrix, (width, height), flags=cv2.INTER_LINEAR) for f in sils])
    moved = pose.copy()
    moved[..., :2] = pose[..., :2] * scale + offset  # warpAffine maps pixel centres by the same matrix
    return warped, moved, dict(scale=scale, shift_x=float(shift[0]), shift_y=float(shift[1]))


@dataclass
class SyntheticReport:
    sequences: int = 0
    frames: int = 0
    partition: GaitPartition | None = None
    nuisances: dict = field(default_factory=dict)


def _rng(seed: int, identity: int, sequence: int) -> np.random.Generator:
    # one stream per (identity, sequence): the output does not depend on generation order
    return np.random.default_rng([seed, identity, sequence])


def _walker_sequences(config: SyntheticConfig, index: int) -> list:
    """Every sequence of walker ``index`` (a unit of work for a process pool)."""
    identity = draw_identity(_rng(config.seed, index, 0))
    return [
        walk_sequence(identity, _rng(config.seed, index, j + 1), config)
        for j in range(config.sequences_per_id)
    ]


def make_synthetic(
    out: str | os.PathLike,
    config: SyntheticConfig,
    progress: Callable[[int, int], None] | None = None,
    workers: int = 1,
) -> SyntheticReport:
    """Write ``config.ids`` walkers in the OpenGait layout under ``out``
    (``<id>/walkNN/<view>/{pose,sils}.pkl``), a Gait3D-style ``partition.json`` and ``synthetic.json`` (the
    configuration and every sequence's nuisances). The folder is built aside and renamed into place;
    ``out`` must be new, empty or an earlier output of this command. ``workers > 1`` renders walkers in that
    many processes; the output is the same (one random stream per walker and sequence)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    report = SyntheticReport()
    sequences = []
    with staged_folder(out, SYNTHETIC_MARKER) as staging, _pool(workers) as pool:
        walkers = pool.map(_walker_sequences, [config] * config.ids, range(config.ids))
        for i, walks in enumerate(walkers):
            if progress is not None:
                progress(i, config.ids)
            name = f"{i:05d}"
            for j, (sils, pose, nuisances) in enumerate(walks):
                if sils.shape[0] == 0:  # every frame dropped: not at these sizes, but never write it
                    continue
                view = f"{nuisances['view']:03d}"
                seq_type = f"walk{j:02d}"
                folder = staging / name / seq_type / view
                dump_array_pickle(folder / "pose.pkl", pose)
                dump_array_pickle(folder / "sils.pkl", sils)
                sequences.append((name, seq_type, view))
                report.nuisances[f"{name}-{seq_type}-{view}"] = nuisances
                report.sequences += 1
                report.frames += sils.shape[0]
        report.partition = make_partition(sequences, test_fraction=config.test_fraction, seed=config.seed)
        write_partition(staging / "partition.json", report.partition)
        write_json(staging / "synthetic.json", {"config": asdict(config), "sequences": report.nuisances})
    return report


@contextmanager
def _pool(workers: int):
    """``map`` in this process, or over ``workers`` processes (results in order either way)."""
    if workers == 1:
        yield SimpleNamespace(map=map)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as executor:
        yield executor
