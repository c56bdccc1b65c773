"""Slow: an item added over HTTP with text only reaches the users it fits, on ml-latest-small
(`make test-all`; about 10 minutes on 2 cores). Skipped when ../shared/data is absent.

The bundle is jobs.quick_train's on the real data (the MovieLens preset's retriever, fewer
epochs), so the fusion weights of items without interactions are fitted on valid as in the
contract command (components.models.channels, ``fit_cold``). Over HTTP on the Serve app: "Toy
Story 4", added with `PUT /v1/items`, is in the top-10 of an anonymous user whose recent items
are the three Toy Story films, and not in that of a user whose recent items are horror films."""

import pytest
import requests

from components.data.sources.movielens import movie_text
from jobs.quick_train import build_bundle
from serve import runner
from tests.conftest import free_port, shared_dataset

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.serve]


@pytest.fixture(scope="module")
def app(ray_local, tmp_path_factory):
    from ray import serve

    data = shared_dataset("ml-latest-small")
    root = tmp_path_factory.mktemp("store")
    bundle = build_bundle(root, run_id="ml-new-items", epochs=20, small=False, force_promote=True,
                          overrides=["data.source=movielens", f"data.path={data}"])
    url = runner.start("configs/serve.yaml", {"storage_root": str(root), "watch_interval_s": 1.0}, port=free_port())
    yield {"url": url, "bundle": bundle}
    serve.shutdown()


def _ids(items, pattern):
    titles = dict(zip(items["item_id"].to_pylist(), items["title"].to_pylist()))
    return [i for i, t in titles.items() if pattern(t)]


def test_a_text_only_item_reaches_the_users_whose_recent_items_are_its_text_neighbours(app):
    items = app["bundle"]["items"]
    toy_story = _ids(items, lambda t: t.startswith("Toy Story"))
    horror = _ids(items, lambda t: t.startswith(("Halloween", "Friday the 13th", "Nightmare on Elm Street")))[:5]
    assert len(toy_story) == 3 and len(horror) == 5, (toy_story, horror)
    genres = ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    new = {"item_id": "toy-story-4", "title": "Toy Story 4 (2019)", "categories": genres,
           "text": movie_text("Toy Story 4 (2019)", genres)}
    out = requests.put(app["url"] + "/v1/items", json={"items": [new]}, timeout=120)
    assert out.status_code == 200 and out.json()["new"] == 1, out.text

    def top(recent):
        r = requests.post(app["url"] + "/v1/recommend", json={"k": 10, "recent_events": [{"item_id": i} for i in recent]},
                          timeout=30)
        assert r.status_code == 200, r.text
        return [it["item_id"] for it in r.json()["items"]]

    print("fusion fitted on valid:", app["bundle"]["pointer"]["lineage"]["fusion"])
    print("Toy Story fans' top-10:", top(toy_story), "horror fans':", top(horror))
    assert "toy-story-4" in top(toy_story)
    assert "toy-story-4" not in top(horror)
