"""The one streaming JSON writer behind ``run --json`` and ``show --json``."""

import json

from imagepipe.json_stream import json_chunks


def test_a_document_is_written_as_json_dumps_writes_it_with_iterators_as_arrays() -> None:
    items = [{"n": i, "text": f"é{i}\x9b"} for i in range(2_501)]
    document = {"id": "r\n1", "items": iter(items), "empty": iter([]), "tail": [1, None]}
    text = "".join(json_chunks(document))
    assert text == json.dumps(document | {"items": items, "empty": []})
