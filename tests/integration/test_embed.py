"""The catalog pass of the LLM (jobs.embed_items, Ray Data actors, the real all-MiniLM-L6-v2):
incremental, so a pass embeds only the items whose text its encoder has not embedded before."""

import numpy as np
import pyarrow as pa
import pytest

from components import layout
from components.config import load_config
from components.models.text_encoder import TextEncoder, TextEncoderConfig, item_text
from components.storage import Storage
from jobs import embed_items, preprocess

pytestmark = pytest.mark.ray


def _vectors(storage, result):
    t = storage.read_parquet(layout.join(result["prefix"], layout.TEXT_EMBEDDINGS)).sort_by("item_idx")
    return t, np.stack(t["embedding"].to_numpy(zero_copy_only=False))


def test_a_pass_embeds_only_new_or_changed_texts_and_reuses_the_rest_exactly(ray_local, tmp_path):
    over = [f"storage.root={tmp_path / 'store'}", "data.synthetic.num_events=2000", "data.synthetic.num_items=120",
            "embed.concurrency=1"]
    cfg = load_config(over)
    ds = preprocess.run(cfg, engine="local")
    storage = Storage(str(tmp_path / "store"))
    first = embed_items.main(load_config(over + ["embed.run_id=a"]))
    n = first["rows"]
    assert first["reused"] == 0 and first["embedded"] == n > 50
    table_a, a = _vectors(storage, first)

    # the same catalog and encoder: nothing to embed, the same vectors
    again = embed_items.main(load_config(over + ["embed.run_id=b"]))
    assert again["reused"] == n and again["embedded"] == 0
    table_b, b = _vectors(storage, again)
    assert np.array_equal(a, b) and table_b["item_id"].equals(table_a["item_id"])

    # one item's text changes (a catalog update): only that item goes through the encoder
    items_path = layout.join(ds["prefix"], layout.ITEMS, "part-00000.parquet")
    items = storage.read_parquet(items_path).sort_by("item_idx")
    titles = items["title"].to_pylist()
    changed = 7
    titles[changed] = "A completely different product: a cast-iron skillet for camping"
    items = items.set_column(items.column_names.index("title"), "title", pa.array(titles, items["title"].type))
    storage.write_parquet(items_path, items)
    third = embed_items.main(load_config(over + ["embed.run_id=c"]))
    assert third["reused"] == n - 1 and third["embedded"] == 1
    _, c = _vectors(storage, third)
    keep = np.arange(n) != changed
    assert np.array_equal(c[keep], a[keep])
    row = items.slice(changed, 1).to_pylist()[0]
    fresh = TextEncoder(TextEncoderConfig()).eval().encode([item_text(row["title"], row["text"], row["categories"])])
    assert np.allclose(c[changed], fresh[0].numpy(), atol=1e-5)
    assert not np.allclose(c[changed], a[changed], atol=1e-2)

    # another encoder setting is another encoder; reuse off embeds everything
    assert embed_items.main(load_config(over + ["embed.run_id=d", "text.max_length=16"]))["embedded"] == n
    assert embed_items.main(load_config(over + ["embed.run_id=e", "embed.reuse=false"]))["embedded"] == n
