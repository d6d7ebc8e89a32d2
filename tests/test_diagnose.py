"""The error table's helpers (the table itself is checked end to end in test_e2e)."""
from edgestar.quant.diagnose import format_rows, node_labels, spread


def test_spread_covers_the_whole_folder():
    items = list(range(100))
    picked = spread(items, 5)
    assert picked[0] == 0 and picked[-1] == 99 and len(set(picked)) == 5
    assert spread(items[:3], 5) == [0, 1, 2]
    assert spread(items, 1) == [0]


def test_node_labels_name_modules_and_the_star_product():
    from edgestar.models.starnet import StarNet, fold_batchnorms
    from edgestar.quant.ranges import trace

    gm = trace(fold_batchnorms(StarNet(16, (1, 1, 1, 1), 3, num_classes=4)))
    labels = node_labels(gm)
    values = set(labels.values())
    assert "stages.0.1.g.conv" in values
    assert "mul after stages.0.1.f2.conv" in values  # the star product
    assert "add after stages.0.1.dwconv2.conv" in values  # the residual add


def test_format_rows_lists_worst_first_and_handles_exact_tensors():
    rows = [{"own_sqnr_db": 20.0, "sqnr_db": 18.0, "op": "MUL", "node": "mul", "where": "mul after f2"},
            {"own_sqnr_db": None, "sqnr_db": None, "op": "RESHAPE", "node": "r"}]
    lines = format_rows(rows, 2)
    assert "mul after f2" in lines[1] and "20.0" in lines[1]
    assert "inf" in lines[2] and lines[2].rstrip().endswith("r")
