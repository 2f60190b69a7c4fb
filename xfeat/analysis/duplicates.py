"""Duplicates and leakage: pixel-identical images, near-duplicate embeddings, and patient ids
present in more than one split.

Only the pixel hashes read images (each decoded once); the near duplicates use the cached
embeddings.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from xfeat.analysis.section import SPLIT_ORDER, Section, count, md_table, split_names
from xfeat.config import DEFAULT_GROUP_PATTERN
from xfeat.data import Dataset, patient_groups
from xfeat.data.dicom import DEFAULT_DICOM, DicomOptions
from xfeat.errors import ImageReadError

logger = logging.getLogger(__name__)

MAX_NEAR_PAIRS = 10_000  # near-duplicate pairs kept (the most similar); the total is counted
SIMILARITY_CHUNK = 1024  # rows of the similarity matrix held at once (1024 x N float32)
EXACT_COLUMNS = ["group", "split", "id", "label", "path"]
NEAR_COLUMNS = [
    "similarity",
    "cross_split",
    "split_a",
    "id_a",
    "label_a",
    "split_b",
    "id_b",
    "label_b",
    "path_a",
    "path_b",
]
PATIENT_COLUMNS = ["patient", "splits", "split", "id", "label"]


def label_text(names: list, label) -> str:
    """A class name, or a multi-label row as its positive labels joined by ``|`` (``none``;
    an unknown entry as ``LABEL?``)."""
    label = np.asarray(label)
    if label.ndim == 0:
        return names[int(label)]
    parts = [n for n, v in zip(names, label) if v == 1] + [
        f"{n}?" for n, v in zip(names, label) if v < 0
    ]
    return "|".join(parts) or "none"


def hash_images(dataset: Dataset, *, progress: bool = True, dicom: DicomOptions = DEFAULT_DICOM) -> dict:
    """sha256 of each image's pixels: ``{split: [hex digest or None if unreadable]}``.

    Folder images are decoded to RGB (so a PNG and a JPEG re-save of the same pixels, or two
    files with different metadata, hash alike), DICOM files as ``dicom`` says (float pixels
    as shown); npz images hash their array bytes and shape.
    """
    total = sum(len(s) for s in dataset.splits.values())
    hashes = {}
    with tqdm(
        total=total, unit="img", desc="pixel hashes", disable=not progress, dynamic_ncols=True
    ) as bar:
        for name, split in dataset.splits.items():
            digests = []
            for i in range(len(split)):
                digests.append(_pixel_hash(split, i, dicom))
                bar.update()
            hashes[name] = digests
    return hashes


def _pixel_hash(split, i: int, dicom: DicomOptions = DEFAULT_DICOM) -> Optional[str]:
    if split.paths is None:
        arr = np.ascontiguousarray(split.arrays[split.array_rows[i]])
        head = f"{arr.shape}{arr.dtype}".encode()
    else:
        try:
            arr = np.asarray(split.read_image(i, dicom=dicom))
        except ImageReadError as exc:
            logger.warning("not hashed: %s", exc)
            return None
        head = f"{arr.shape}".encode()
    return hashlib.sha256(head + arr.tobytes()).hexdigest()


def duplicates_section(
    features,
    dataset: Dataset,
    hashes: dict,
    *,
    threshold: float = 0.995,
    max_pairs: int = MAX_NEAR_PAIRS,
) -> Section:
    """Exact duplicate groups, near-duplicate pairs and patients across splits.

    ``hashes`` are :func:`hash_images`'s of ``dataset``, the images behind ``features``.
    Every group, pair and patient goes to a CSV; the summary keeps counts and the top of
    each list.
    """
    images = _image_table(dataset, hashes)
    groups = exact_duplicate_groups(images)
    exact_rows = [{"group": g["group"], **m} for g in groups for m in g["members"]]
    near, near_rows = _near_duplicates(features, images, threshold, max_pairs)
    # The val carve-out kept a patient's images together with this pattern; use the same.
    pattern = (
        dataset.split_info.get("group_pattern", DEFAULT_GROUP_PATTERN)
        if dataset.split_info.get("val") == "carved from train"
        else DEFAULT_GROUP_PATTERN
    )
    patients, patient_rows = patients_across_splits(images, pattern, groups, near_rows)
    summary = {"exact": _exact_summary(groups, dataset, hashes), "near": near, "patients": patients}
    return Section(
        "duplicates",
        "Duplicates and leakage",
        summary,
        headlines=_headlines(summary),
        markdown=_markdown(summary),
        tables={
            "duplicates_exact.csv": (exact_rows, EXACT_COLUMNS),
            "duplicates_near.csv": (near_rows, NEAR_COLUMNS),
            "patients_across_splits.csv": (patient_rows, PATIENT_COLUMNS),
        },
    )


def _image_table(dataset: Dataset, hashes: dict) -> dict:
    """Flat per-image lists over every split, and id -> content index / path lookups."""
    table = {"split": [], "id": [], "label": [], "path": {}, "hash": []}
    names = dataset.class_names
    # a label table's patient column names every image's patient
    with_patients = all(sp.groups is not None for sp in dataset.splits.values())
    table["patient"] = (
        [g for sp in dataset.splits.values() for g in sp.groups] if with_patients else None
    )
    dicom_group = getattr(dataset, "dicom_group", None)
    table["patients_from"] = (
        (f"DICOM tag {dicom_group}" if dicom_group else "patient column")
        if with_patients
        else "file names"
    )
    for s, sp in dataset.splits.items():
        table["split"] += [s] * len(sp)
        table["id"] += list(sp.ids)
        table["label"] += [label_text(names, y) for y in sp.labels]
        table["hash"] += hashes[s]
        if sp.paths is not None:
            table["path"].update(zip(sp.ids, sp.paths))
    readable = [k for k, h in enumerate(table["hash"]) if h is not None]
    _, inverse = np.unique(
        np.array([table["hash"][k] for k in readable], dtype=object).astype(str), return_inverse=True
    )
    table["content"] = {table["id"][k]: int(c) for k, c in zip(readable, inverse.ravel())}
    return table


def exact_duplicate_groups(images: dict) -> list:
    """Groups of two or more pixel-identical images, members and groups in a stable order."""
    members = {}
    for k, image_id in enumerate(images["id"]):
        c = images["content"].get(image_id)
        if c is not None:
            members.setdefault(c, []).append(k)
    groups = []
    for rows in members.values():
        if len(rows) < 2:
            continue
        rows = sorted(rows, key=lambda k: (SPLIT_ORDER.index(images["split"][k]), images["id"][k]))
        splits = sorted({images["split"][k] for k in rows}, key=SPLIT_ORDER.index)
        labels = sorted({images["label"][k] for k in rows})
        groups.append(
            {
                "members": [
                    {
                        "split": images["split"][k],
                        "id": images["id"][k],
                        "label": images["label"][k],
                        "path": images["path"].get(images["id"][k], ""),
                    }
                    for k in rows
                ],
                "splits": splits,
                "across_splits": len(splits) > 1,
                "labels": labels,
                "label_conflict": len(labels) > 1,
            }
        )
    groups.sort(key=lambda g: (SPLIT_ORDER.index(g["members"][0]["split"]), g["members"][0]["id"]))
    return [{"group": n, **g} for n, g in enumerate(groups, 1)]


def _exact_summary(groups: list, dataset: Dataset, hashes: dict) -> dict:
    pair_counts = {}
    for g in groups:
        if g["across_splits"]:
            key = "-".join(g["splits"])
            pair_counts[key] = pair_counts.get(key, 0) + 1
    return {
        "method": "sha256 of decoded RGB pixels and shape (npz: array bytes)",
        "n_images_hashed": int(sum(h is not None for v in hashes.values() for h in v)),
        "unreadable": [
            i for s, sp in dataset.splits.items() for i, h in zip(sp.ids, hashes[s]) if h is None
        ],
        "n_groups": len(groups),
        "n_images_in_groups": sum(len(g["members"]) for g in groups),
        "n_groups_across_splits": sum(g["across_splits"] for g in groups),
        "across_split_pairs": pair_counts,
        "n_groups_label_conflict": sum(g["label_conflict"] for g in groups),
        "groups": [
            {**g, "members": [{k: m[k] for k in ("split", "id", "label")} for m in g["members"]]}
            for g in groups
        ],
    }


def _near_duplicates(features, images: dict, threshold: float, max_pairs: int):
    """Near-duplicate pairs of the cached embeddings: ``(summary, CSV rows)``."""
    names = features.class_names
    splits = split_names(features)
    ids = [i for s in splits for i in features[s].ids]
    row_split = np.array([s for s in splits for _ in range(len(features[s]))], dtype=object)
    labels = np.concatenate([features[s].labels for s in splits])
    # Pixel-identical pairs are listed as exact duplicates already; unhashed images get a
    # content index of their own.
    content = np.array([images["content"].get(i, -1 - k) for k, i in enumerate(ids)])
    X = np.concatenate([features[s].features for s in splits])
    a, b, sim, n_total = near_duplicate_pairs(X, content, threshold=threshold, max_pairs=max_pairs)
    cross = (row_split[a] != row_split[b]).astype(bool)
    path = images["path"]
    rows = [
        {
            "similarity": round(float(s), 6),
            "cross_split": bool(c),
            "split_a": row_split[i],
            "id_a": ids[i],
            "label_a": label_text(names, labels[i]),
            "split_b": row_split[j],
            "id_b": ids[j],
            "label_b": label_text(names, labels[j]),
            "path_a": path.get(ids[i], ""),
            "path_b": path.get(ids[j], ""),
        }
        for i, j, s, c in zip(a, b, sim, cross)
    ]
    across = {}
    for r in rows:
        if r["cross_split"]:
            key = "-".join(sorted((r["split_a"], r["split_b"]), key=SPLIT_ORDER.index))
            across[key] = across.get(key, 0) + 1
    summary = {
        "method": "cosine similarity of L2-normalised embeddings, pixel-identical pairs excluded",
        "threshold": threshold,
        "n_pairs": int(n_total),
        "n_listed": len(rows),
        "truncated": bool(n_total > len(rows)),
        "n_pairs_across_splits": int(cross.sum()),
        "across_split_pairs": across,
        "top": rows[:50],
    }
    return summary, rows


def near_duplicate_pairs(
    X: np.ndarray,
    content: np.ndarray,
    *,
    threshold: float,
    max_pairs: int = MAX_NEAR_PAIRS,
    chunk: int = SIMILARITY_CHUNK,
):
    """Pairs ``i < j`` with cosine similarity >= threshold and different ``content``.

    Computed ``chunk`` rows at a time against the rows after them (memory ``chunk x N``);
    only the ``max_pairs`` most similar pairs are kept, the total is counted. Returns
    ``(i, j, similarity, n_total)``, sorted by decreasing similarity.
    """
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    Xn = X / np.where(norms > 0, norms, 1.0)
    content = np.asarray(content)
    keep_i, keep_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    keep_s = [np.zeros(0, np.float32)]
    n_total = 0
    kept = 0
    for start in range(0, len(Xn), chunk):
        stop = min(start + chunk, len(Xn))
        S = Xn[start:stop] @ Xn[start:].T  # columns start.. : each pair once
        i_local, j_local = np.nonzero(S >= threshold)
        i, j = i_local + start, j_local + start
        upper = (j > i) & (content[i] != content[j])
        i, j = i[upper], j[upper]
        s = S[i_local[upper], j_local[upper]]
        n_total += len(i)
        keep_i.append(i)
        keep_j.append(j)
        keep_s.append(s)
        kept += len(i)
        if kept > 2 * max_pairs:  # bound memory when the threshold is loose
            keep_i, keep_j, keep_s = _top_pairs(keep_i, keep_j, keep_s, max_pairs)
            kept = len(keep_i[0])
    (i,), (j,), (s,) = _top_pairs(keep_i, keep_j, keep_s, max_pairs)
    return i, j, s, n_total


def _top_pairs(keep_i, keep_j, keep_s, max_pairs):
    i, j, s = np.concatenate(keep_i), np.concatenate(keep_j), np.concatenate(keep_s)
    order = np.lexsort((j, i, -s))[:max_pairs]  # most similar first; ties by index
    return [i[order]], [j[order]], [s[order]]


def patients_across_splits(images: dict, pattern: Optional[str], exact_groups: list, near_rows: list):
    """Patient ids (a table's patient column, else from file names where ``pattern``
    matched) present in several splits.

    Each such patient is marked ``pixel_evidence`` when one of its cross-split image pairs
    is also an exact or near duplicate: matching ids then likely are the same person.
    Returns ``(summary, CSV rows)``.
    """
    # where the ids come from: a patient column or DICOM tag, else the file names
    source = images.get("patients_from") or ("patient column" if images.get("patient") else "file names")
    if images.get("patient"):  # a table's patient column: every image has its patient
        groups, named = images["patient"], [True] * len(images["id"])
    elif not pattern:
        return {"pattern": None, "skipped": "no patient pattern (grouping disabled)"}, []
    else:
        groups = patient_groups(images["id"], pattern)
        named = [g != image_id for g, image_id in zip(groups, images["id"])]  # the pattern matched
    by_patient = {}
    for k, g in enumerate(groups):
        if named[k]:
            by_patient.setdefault(g, []).append(k)
    leaking = {}
    for g, rows in by_patient.items():
        splits = sorted({images["split"][k] for k in rows}, key=SPLIT_ORDER.index)
        if len(splits) > 1:
            leaking[g] = (splits, rows)
    patient_of = dict(zip(images["id"], groups))
    pairs = [
        (m["id"], n["id"])
        for grp in exact_groups
        for m in grp["members"]
        for n in grp["members"]
        if m["split"] != n["split"]
    ]
    pairs += [(r["id_a"], r["id_b"]) for r in near_rows if r["cross_split"]]
    evidence = {
        patient_of[a]
        for a, b in pairs
        if patient_of.get(a) == patient_of.get(b) and patient_of.get(a) in leaking
    }
    rows_out, listed, split_pairs = [], [], {}
    for g in sorted(leaking):
        splits, rows = leaking[g]
        key = "-".join(splits)
        split_pairs[key] = split_pairs.get(key, 0) + 1
        listed.append(
            {
                "patient": g,
                "splits": splits,
                "images": {s: sum(images["split"][k] == s for k in rows) for s in splits},
                "pixel_evidence": g in evidence,
            }
        )
        for k in sorted(rows, key=lambda k: (SPLIT_ORDER.index(images["split"][k]), images["id"][k])):
            rows_out.append(
                {
                    "patient": g,
                    "splits": ";".join(splits),
                    "split": images["split"][k],
                    "id": images["id"][k],
                    "label": images["label"][k],
                }
            )
    summary = {
        "pattern": pattern,
        "patients_from": source,
        "n_images_matched": sum(len(v) for v in by_patient.values()),
        "n_patients": len(by_patient),
        "n_across_splits": len(leaking),
        "n_images_across_splits": sum(len(r) for _, r in leaking.values()),
        "across_split_pairs": split_pairs,
        "n_with_pixel_evidence": len(evidence),
        "note": f"patient ids come from the {source}; if a "
        "split numbers its patients independently, equal ids may be different people. "
        "pixel_evidence marks patients with an exact or near duplicate across splits.",
        "patients": listed,
    }
    return summary, rows_out


def _headlines(s: dict) -> list:
    ex, near, pat = s["exact"], s["near"], s["patients"]
    if ex["n_groups"]:
        text = (
            f"{count(ex['n_groups'], 'group')} of pixel-identical images "
            f"({ex['n_images_in_groups']} images), {ex['n_groups_across_splits']} across "
            "splits"
        )
        if ex["across_split_pairs"]:
            text += " (" + ", ".join(f"{k}: {v}" for k, v in ex["across_split_pairs"].items()) + ")"
        if ex["n_groups_label_conflict"]:
            text += f"; {ex['n_groups_label_conflict']} with conflicting labels"
        lines = [text]
    else:
        lines = [f"no pixel-identical images among {ex['n_images_hashed']}"]
    if near["n_pairs"]:
        more = "+" if near["truncated"] else ""
        lines.append(
            f"{count(near['n_pairs'], 'near-duplicate pair')}{more} "
            f"(cosine >= {near['threshold']}, not pixel-identical), "
            f"{near['n_pairs_across_splits']}{more} across splits"
        )
    if pat.get("n_across_splits"):
        lines.append(
            f"{count(pat['n_across_splits'], 'patient id')} in more than one split "
            f"({', '.join(f'{k}: {v}' for k, v in pat['across_split_pairs'].items())}; "
            f"{pat['n_with_pixel_evidence']} confirmed by duplicate pixels or embeddings)"
        )
    return lines


def _markdown(s: dict) -> list:
    ex, near = s["exact"], s["near"]
    out = [
        "### Pixel-identical images",
        "",
        f"{ex['n_images_hashed']} images hashed ({ex['method']}): **{ex['n_groups']} "
        f"groups** ({ex['n_images_in_groups']} images), {ex['n_groups_across_splits']} "
        f"across splits, {ex['n_groups_label_conflict']} with conflicting labels. "
        "All in `duplicates_exact.csv`.",
        "",
    ]
    if ex["unreadable"]:
        out += [f"Unreadable, not hashed: {', '.join(ex['unreadable'][:10])}", ""]
    if ex["groups"]:
        out += md_table(
            ["group", "splits", "labels", "images"],
            [
                [
                    g["group"],
                    ", ".join(g["splits"]),
                    ", ".join(g["labels"]),
                    "<br>".join(f"{m['split']}: `{m['id']}`" for m in g["members"]),
                ]
                for g in ex["groups"][:40]
            ],
        )
        out += [""] + _more(len(ex["groups"]) - 40, "groups")
    out += [
        "### Near duplicates",
        "",
        f"{near['method']}, at or above {near['threshold']}: **{near['n_pairs']} pairs**, "
        f"{near['n_pairs_across_splits']} across splits"
        + (f" (the {near['n_listed']} most similar are listed)" if near["truncated"] else "")
        + ". All in `duplicates_near.csv`.",
        "",
    ]
    if near["top"]:
        out += md_table(
            ["similarity", "a", "b", "cross split"],
            [
                [
                    f"{p['similarity']:.4f}",
                    f"{p['split_a']}: `{p['id_a']}`",
                    f"{p['split_b']}: `{p['id_b']}`",
                    "yes" if p["cross_split"] else "",
                ]
                for p in near["top"][:20]
            ],
        )
        out += [""]
    return out + _patients_markdown(s["patients"])


def _patients_markdown(pat: dict) -> list:
    out = ["### Patients in more than one split", ""]
    if not pat.get("pattern"):
        return out + [f"Not checked: {pat.get('skipped')}.", ""]
    out += [
        f"Patient ids from file names (pattern `{pat['pattern']}`, matched "
        f"{pat['n_images_matched']} images, {pat['n_patients']} patients): "
        f"**{count(pat['n_across_splits'], 'patient')}** ({pat['n_images_across_splits']} "
        f"images) in more than one split; {pat['n_with_pixel_evidence']} of them have a "
        f"duplicate image across splits. {pat['note']} All in `patients_across_splits.csv`.",
        "",
    ]
    if pat["patients"]:
        out += md_table(
            ["patient", "splits", "images", "pixel evidence"],
            [
                [
                    p["patient"],
                    ", ".join(p["splits"]),
                    ", ".join(f"{k} {v}" for k, v in p["images"].items()),
                    "yes" if p["pixel_evidence"] else "",
                ]
                for p in pat["patients"][:30]
            ],
        )
        out += [""] + _more(len(pat["patients"]) - 30, "patients")
    return out


def _more(n: int, what: str) -> list:
    return [f"... and {n} more {what}.", ""] if n > 0 else []
