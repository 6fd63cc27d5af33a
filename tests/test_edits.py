"""Counterfactual expression edits: parsing, panel validation, count-space scaling, the rows of an edit grid."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bundle.sampling.edit_grid import edit_effects, edited_genes, generate_variants, parse_edit_rows, row_labels
from bundle.sampling.edits import GeneEdit, apply_edits, edit_direction, parse_edit, read_gene_sets, resolve_edit

GENES = ["CD3E", "PTPRC", "EPCAM", "CA9", "VEGFA", "ACTB"]


def test_parse_and_directions():
    assert parse_edit("immune*4") == GeneEdit("immune", "scale", 4.0)
    assert parse_edit(" CD3E = 2.5 ") == GeneEdit("CD3E", "set", 2.5)
    assert str(parse_edit("hypoxia*0")) == "hypoxia*0"
    assert edit_direction("immune*4") == 1 and edit_direction("hypoxia*0") == -1 and edit_direction("x*1") == 0
    assert edit_direction("CD3E=1", before=2.0) == -1
    for bad in ["immune", "immune*", "immune*-2", "CD3E=abc", "*4"]:
        with pytest.raises(ValueError, match="edit"):
            parse_edit(bad)


def test_scaling_happens_in_count_space_and_sets_use_panel_members():
    x = np.log1p(np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], dtype=np.float32))
    y = apply_edits(x, GENES, ["immune*4", "hypoxia*0", "EPCAM=0.5"])
    np.testing.assert_allclose(np.expm1(y[0, :2]), [4.0, 8.0], rtol=1e-5)  # CD3E and PTPRC (both in the immune set)
    np.testing.assert_allclose(y[0, 3:5], 0.0)  # CA9 and VEGFA silenced
    assert y[0, 2] == pytest.approx(0.5) and y[0, 5] == x[0, 5]
    assert x[0, 0] == pytest.approx(np.log1p(1.0))  # input untouched
    with_neighbours = apply_edits(np.repeat(x[:, None], 7, axis=1), GENES, ["CD3E*2"])
    np.testing.assert_allclose(np.expm1(with_neighbours[0, :, 0]), 2.0, rtol=1e-5)


def test_unknown_names_are_refused_with_suggestions(tmp_path):
    with pytest.raises(ValueError, match=r"'CD3F' is neither.*Did you mean CD3E"):
        apply_edits(np.zeros(6), GENES, ["CD3F*2"])
    with pytest.raises(ValueError, match="none of the genes of the set 'adipose'"):
        resolve_edit(parse_edit("adipose*2"), GENES)
    with pytest.raises(ValueError, match="the panel has 6"):
        apply_edits(np.zeros(5), GENES, ["CD3E*2"])
    path = tmp_path / "sets.json"
    path.write_text(json.dumps({"tcell": ["CD3E", "CD8A"]}))
    sets = read_gene_sets(path)
    assert resolve_edit(parse_edit("tcell*2"), GENES, sets) == [0]
    gmt = tmp_path / "sets.gmt"
    gmt.write_text("epi\tepithelium\tEPCAM\tKRT8\n")
    assert read_gene_sets(gmt) == {"epi": ["EPCAM", "KRT8"]}
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must map set names"):
        read_gene_sets(tmp_path / "bad.json")


def test_edit_rows_genes_labels_and_effects():
    rows = parse_edit_rows(["immune*4", " CD3E=3 , CA9*0 "])
    assert rows == [["immune*4"], ["CD3E=3", "CA9*0"]]
    assert row_labels(rows) == ["original", "immune*4", "CD3E=3,CA9*0"]
    assert [sorted(g) for g in edited_genes(rows, GENES)] == [["CD3E", "PTPRC"], ["CA9", "CD3E"]]
    with pytest.raises(ValueError, match="holds no edit"):
        parse_edit_rows(["immune*4", " , "])
    with pytest.raises(ValueError, match="NOTAGENE"):
        edited_genes([["NOTAGENE*2"]], GENES)
    original = np.log1p(np.tile(np.arange(1.0, 7.0, dtype=np.float32), (2, 7, 1)))  # 2 spots with 6 neighbours
    variants = [original] + [apply_edits(original, GENES, row) for row in rows]
    effects = edit_effects(row_labels(rows), edited_genes(rows, GENES), variants, GENES)
    assert [e["row"] for e in effects] == [1, 2] and effects[1]["genes"] == ["CD3E", "CA9"]
    assert effects[0]["mean_log1p_before"] == pytest.approx(np.log1p([1.0, 2.0]).mean(), abs=1e-4)
    assert effects[0]["mean_log1p_after"] == pytest.approx(np.log1p([4.0, 8.0]).mean(), abs=1e-4)
    assert effects[1]["mean_log1p_after"] == pytest.approx(1.5, abs=1e-4)  # CD3E set to 3, CA9 silenced


def test_variants_share_each_spots_seed():
    import torch

    calls = []

    def pipeline(condition, num_inference_steps, guidance_scale, generator):
        calls.append(len(condition))
        noise = torch.stack([torch.rand(3, 2, 2, generator=g) for g in generator])
        return noise + condition[:, :1, :1, None]

    variants = [np.zeros((3, 1, 2), np.float32), np.ones((3, 1, 2), np.float32)]
    images = generate_variants(pipeline, variants, [5, 6, 7], 2, 1.0, batch_size=4)
    assert images.shape == (2, 3, 3, 2, 2) and calls == [4, 2]
    torch.testing.assert_close(images[1] - images[0], torch.ones_like(images[0]))  # same noise: only the edit differs
    assert not torch.equal(images[0, 0], images[0, 1])
