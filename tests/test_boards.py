"""The board table (firmware_assets/boards.toml) and the fits / does-not-fit verdict.

Stdlib and the table only: no TensorFlow (conftest's autouse fixture checks).
"""
from __future__ import annotations

import copy
import json
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgestar.deploy import boards as B
from edgestar.deploy.boards import Board, format_verdict, get_board, load_boards, parse_boards, verdict
from edgestar.errors import InputError

REQUIRED = ("nano33ble", "pico", "pico2", "esp32s3", "esp32s3-psram", "stm32f746-disco", "stm32h743",
            "corstone-300", "nrf5340")


def board(**over) -> Board:
    """A hand-made board with round numbers: 1,000 B flash (100 reserved), arena region 500 B
    (100 reserved)."""
    fields = dict(name="toy", description="a toy", mcu="TOY1", core="cortex-m4", clock_mhz=64,
                  flash_bytes=1_000, flash_reserve_bytes=100, ram_bytes=600, arena_region_bytes=500,
                  reserve_bytes=100, family="arm-cortex-m", sources={k: "made up" for k in B.SOURCED})
    fields.update(over)
    return Board(**fields)


def good_table() -> dict:
    return tomllib.loads(B._default_table().read_text())


def one_line_error(data, where="t.toml") -> str:
    with pytest.raises(InputError) as e:
        parse_boards(data, where)
    message = str(e.value)
    assert "\n" not in message and message.startswith(where), message
    return message


# --------------------------------------------------------------------------- the shipped table

def test_every_required_board_is_there_with_positive_figures_and_sources():
    table = load_boards()
    assert set(REQUIRED) <= set(table)
    for name in REQUIRED:
        b = table[name]
        assert b.name == name and b.description and b.mcu
        for field in B.INT_FIELDS:
            value = getattr(b, field)
            assert isinstance(value, int) and (value > 0 or field in B.ZERO_ALLOWED), (name, field)
        assert set(b.sources) == set(B.SOURCED) and all(len(s) > 10 for s in b.sources.values()), name
        assert b.arena_region_bytes <= b.ram_bytes, name
        assert 0 < b.usable_arena_bytes and 0 < b.usable_flash_bytes <= b.flash_bytes, name


def test_the_table_says_what_the_datasheets_say():
    """Spot checks of the figures the issue and facts.md name."""
    t = load_boards()
    nano = t["nano33ble"]
    assert (nano.core, nano.ram_bytes, nano.flash_bytes) == ("cortex-m4", 256 << 10, 1 << 20)
    assert (t["pico"].core, t["pico"].ram_bytes) == ("cortex-m0plus", 264 << 10)
    assert (t["pico2"].core, t["pico2"].ram_bytes) == ("cortex-m33", 520 << 10)
    assert t["stm32h743"].arena_region_bytes == 512 << 10  # AXI SRAM, not the 1 MB total
    assert t["esp32s3-psram"].arena_region_bytes == 8 << 20  # the N8R8 module's PSRAM
    assert t["esp32s3"].family == t["esp32s3-psram"].family == "esp32" and t["esp32s3"].core == "xtensa-lx7"
    assert t["corstone-300"].core == "cortex-m55"
    assert all(b.family == "arm-cortex-m" for n, b in t.items() if not n.startswith("esp32"))


def test_unknown_board_lists_the_choices():
    assert get_board("pico").mcu == "RP2040"
    with pytest.raises(InputError, match=r"unknown board 'pico3'; choose one of: .*nano33ble.*nrf5340"):
        get_board("pico3")


def test_board_to_json_round_trips():
    b = get_board("stm32h743")
    assert Board(**json.loads(json.dumps(b.to_json()))) == b


# --------------------------------------------------------------------------- the verdict

def test_verdict_arithmetic_on_hand_made_numbers():
    v = verdict(board(), model_bytes=600, arena_bytes=300, code_bytes_estimate=100)
    assert v["fits"] is True and v["reason"] is None
    flash, ram = v["flash"], v["ram"]
    assert (flash["used_bytes"], flash["budget_bytes"], flash["headroom_bytes"]) == (700, 900, 200)
    assert v["flash"]["headroom_percent"] == pytest.approx(22.2)
    assert (ram["budget_bytes"], ram["headroom_bytes"], ram["headroom_percent"]) == (400, 100, 25.0)
    assert v["flash"]["code_bytes_is_default"] is False
    json.dumps(v)  # JSON-able


def test_exact_fit_fits_and_one_byte_more_does_not():
    exact = verdict(board(), model_bytes=800, arena_bytes=400, code_bytes_estimate=100)
    assert exact["fits"] and exact["flash"]["headroom_bytes"] == exact["ram"]["headroom_bytes"] == 0
    assert exact["flash"]["headroom_percent"] == exact["ram"]["headroom_percent"] == 0.0

    ram_over = verdict(board(), model_bytes=800, arena_bytes=401, code_bytes_estimate=100)
    assert not ram_over["fits"] and ram_over["flash"]["fits"] and not ram_over["ram"]["fits"]
    assert ram_over["reason"].startswith("RAM: arena 401 B exceeds the 400 B")
    assert ram_over["reason"].endswith("by 1 B")

    flash_over = verdict(board(), model_bytes=801, arena_bytes=400, code_bytes_estimate=100)
    assert not flash_over["fits"] and flash_over["ram"]["fits"]
    assert flash_over["reason"] == ("flash: model 801 B + code 100 B = 901 B exceeds the 900 B usable flash "
                                    "by 1 B")

    both = verdict(board(), model_bytes=801, arena_bytes=401, code_bytes_estimate=100)
    assert both["reason"].count("; ") == 1 and "\n" not in both["reason"]


def test_default_code_size_is_an_estimate_and_says_so():
    v = verdict(board(flash_bytes=1 << 20, flash_reserve_bytes=0), model_bytes=0, arena_bytes=0)
    assert v["flash"]["code_bytes"] == B.DEFAULT_CODE_BYTES == 100 * 1024
    assert v["flash"]["code_bytes_is_default"] and "estimate" in v["flash"]["code_bytes_source"]
    assert "(estimate)" in format_verdict(v)


@pytest.mark.parametrize("bad", [-1, 1.5, "100", True, None])
def test_verdict_rejects_sizes_that_are_not_byte_counts(bad):
    with pytest.raises(InputError, match="arena_bytes must be a byte count"):
        verdict(board(), model_bytes=1, arena_bytes=bad)


def test_format_verdict_reads_like_the_issue():
    v = verdict(get_board("nano33ble"), model_bytes=300_000, arena_bytes=200_000)
    text = format_verdict(v)
    first = text.splitlines()[0]
    assert first.startswith("nano33ble (nRF52840, Cortex-M4 64 MHz): DOES NOT FIT — "
                            "arena 200,000 B > 196,608 B usable RAM")
    assert "headroom -3,392 B" in text and len(text.splitlines()) == 3
    fits = format_verdict(verdict(get_board("corstone-300"), model_bytes=300_000, arena_bytes=141_744))
    assert fits.splitlines()[0].endswith(": FITS")


# --------------------------------------------------------------------------- malformed tables

def test_missing_field():
    data = good_table()
    del data["boards"]["pico"]["ram_bytes"]
    assert one_line_error(data) == "t.toml: board 'pico': field 'ram_bytes': missing"


def test_negative_number():
    data = good_table()
    data["boards"]["pico2"]["flash_bytes"] = -4
    assert one_line_error(data) == "t.toml: board 'pico2': field 'flash_bytes': must be positive, got -4"


@pytest.mark.parametrize("value", ["512K", 1.5, True, [1], {"a": 1}])
def test_wrong_type(value):
    data = good_table()
    data["boards"]["nrf5340"]["reserve_bytes"] = value
    assert "board 'nrf5340': field 'reserve_bytes': must be an integer" in one_line_error(data)


def test_unknown_keys():
    data = good_table()
    data["boards"]["pico"]["sram_bytes"] = 1
    assert "board 'pico': field 'sram_bytes': unknown field" in one_line_error(data)
    data = good_table()
    data["boards"]["pico"]["sources"]["colour"] = "blue"
    assert "board 'pico': field 'sources.colour': no such figure" in one_line_error(data)
    data = good_table()
    data["version"] = 2
    assert "unknown top-level key 'version'" in one_line_error(data)


def test_every_figure_needs_a_source():
    data = good_table()
    del data["boards"]["stm32h743"]["sources"]["arena_region_bytes"]
    assert "board 'stm32h743': field 'sources.arena_region_bytes': missing or empty" in one_line_error(data)


@pytest.mark.parametrize("field, value, message", [
    ("arena_region_bytes", 2 << 20, "is more than ram_bytes"),
    ("reserve_bytes", 524_288, "leaves nothing of arena_region_bytes"),
    ("flash_reserve_bytes", 1 << 20, "must be less than flash_bytes"),
    ("core", "cortex-a53", "unknown core"),
    ("family", "esp32", "does not match core 'cortex-m33'"),
    ("description", "", "non-empty one-line string"),
])
def test_inconsistent_figures(field, value, message):
    data = good_table()
    data["boards"]["nrf5340"][field] = value
    assert message in one_line_error(data)


def test_load_boards_names_the_file(tmp_path):
    bad = tmp_path / "boards.toml"
    bad.write_text("[boards.x\n")
    with pytest.raises(InputError, match=rf"^{bad}: invalid TOML: ") as e:
        load_boards(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="cannot read the board table"):
        load_boards(tmp_path / "absent.toml")
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(InputError, match="not a UTF-8 text file"):
        load_boards(bad)


def test_a_copy_of_the_table_loads(tmp_path):
    copy_ = tmp_path / "mine.toml"
    copy_.write_text(B._default_table().read_text())
    assert load_boards(copy_) == load_boards()


# --------------------------------------------------------------------------- property

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 40), 1 << 40), st.floats(allow_nan=True),
                    st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=12)
field_names = st.sampled_from(B.BOARD_FIELDS + ("extra",))


def mutated_tables():
    """Mostly-valid tables with one or more fields replaced, dropped or added, plus pure noise."""
    def mutate(edits):
        data = copy.deepcopy(GOOD)
        for name, field, value, drop in edits:
            entry = data["boards"][name]
            if drop:
                entry.pop(field, None)
            else:
                entry[field] = value
        return data
    edit = st.tuples(st.sampled_from(REQUIRED), field_names, values, st.booleans())
    return st.one_of(st.lists(edit, min_size=1, max_size=3).map(mutate),
                     st.dictionaries(st.text(max_size=8), values, max_size=3),
                     st.dictionaries(st.just("boards"),
                                     st.dictionaries(st.text(max_size=8), values, max_size=3)),
                     values)


GOOD = tomllib.loads(B._default_table().read_text())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_tables())
def test_random_tables_raise_only_one_line_input_errors(data):
    try:
        out = parse_boards(data, "t.toml")
    except InputError as e:
        assert "\n" not in str(e) and str(e).startswith("t.toml")
    else:
        assert all(isinstance(b, Board) and b.usable_arena_bytes > 0 for b in out.values())


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_random_files_raise_only_input_errors(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("t") / "boards.toml"
    path.write_text(text, encoding="utf-8")
    try:
        load_boards(path)
    except InputError as e:
        assert "\n" not in str(e)
