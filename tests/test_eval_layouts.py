"""Dataset layouts (CORD-v2, VQA, captions) from small synthetic parquet and JSONL files made here: detection,
conversion to examples and to training records, images as bytes, paths and {"bytes", "path"} objects, and
the errors for what cannot be read. The processor oracle is transformers' own (the tiny processor)."""

from __future__ import annotations

import base64
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gemma3vl.data import BadRecord, ConversationDataset, DataConfig
from gemma3vl.data.images import ImageLoader
from gemma3vl.data.records import ImageRef, parse_record
from gemma3vl.errors import Gemma3VLError
from gemma3vl.evaluation.layouts import CAPTION_PROMPT, CORD_PROMPT, VQA_SUFFIX, ExampleFile, LayoutSource
from gemma3vl.pictures import draw_picture
from test_data_common import processor  # noqa: F401  (fixture)

RECEIPT = {"menu": [{"nm": "Latte", "cnt": "1", "price": "4.50"}, {"nm": "Bagel", "cnt": "2", "price": "6.00"}],
           "total": {"total_price": "10.50"}}


def png(kind: str = "red circle", seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    draw_picture(kind, size=(40, 32), seed=seed).save(buffer, format="PNG")
    return buffer.getvalue()


def pixels(image: Image.Image) -> bytes:
    return image.convert("RGB").tobytes()


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def opened(example):
    """The example's images opened as training and eval open them."""
    return [ImageLoader().load(part, example.base_dir, example.source)
            for turn in example.turns if not isinstance(turn.content, str)
            for part in turn.content if isinstance(part, ImageRef)]


def test_cord_parquet_with_image_bytes(tmp_path):
    image = png("blue square")
    ground_truth = {"gt_parse": RECEIPT, "meta": {"version": "2.0"}, "valid_line": []}
    path = write_parquet(tmp_path / "cord.parquet", [
        {"image": {"bytes": image, "path": "receipt_00000.png"}, "ground_truth": json.dumps(ground_truth)},
    ])
    examples = ExampleFile(path)
    assert examples.layout == "cord"
    example = examples.example(0)
    # compact JSON, keys sorted at every level, so the target is one stable string
    assert example.target == ('{"menu":[{"cnt":"1","nm":"Latte","price":"4.50"},{"cnt":"2","nm":"Bagel",'
                              '"price":"6.00"}],"total":{"total_price":"10.50"}}')
    assert json.loads(example.target) == RECEIPT and example.references == [example.target]
    assert example.prompt_text == "<image>" + CORD_PROMPT
    assert example.id == 0 and example.source == f"{path}:row 0"
    assert pixels(opened(example)[0]) == pixels(Image.open(io.BytesIO(image)))
    # as a training record: a user turn (image, prompt) and the assistant's JSON
    record = example.conversation_record()
    conversation = parse_record(record, example.source, example.base_dir)
    assert [turn.role for turn in conversation.turns] == ["user", "assistant"]
    assert conversation.turns[1].content == example.target


def test_vqa_parquet_with_image_paths_and_vqav2_answer_objects(tmp_path):
    (tmp_path / "images").mkdir()
    draw_picture("green triangle", size=(40, 32)).save(tmp_path / "images" / "q.png")
    answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i}
               for i, a in enumerate(["2", "two", "2", "3", "2", "2", "3", "2", "2", "2"])]
    path = write_parquet(tmp_path / "vqa.parquet", [
        {"question_id": 7, "image": "images/q.png", "question": "How many?", "answers": answers},
    ])
    objects = write_parquet(tmp_path / "objects.parquet", [  # HF's Image feature with only a path
        {"question_id": 8, "image": {"bytes": None, "path": "images/q.png"}, "question": "Colour?",
         "answers": [{"answer": "green", "answer_confidence": "yes", "answer_id": 0}]},
    ])
    examples = ExampleFile(path)
    assert examples.layout == "vqa"
    first = examples.example(0)
    assert first.id == 7 and first.target == "2"  # the most frequent answer
    assert first.references == [a["answer"] for a in answers]
    assert first.prompt_text == f"<image>How many?\n{VQA_SUFFIX}"
    second = ExampleFile(objects).example(0)
    assert second.references == ["green"]
    expected = pixels(Image.open(tmp_path / "images" / "q.png"))
    assert pixels(opened(first)[0]) == expected and pixels(opened(second)[0]) == expected


def test_docvqa_and_chartqa_style_jsonl(tmp_path):
    draw_picture("red circle").save(tmp_path / "doc.png")
    encoded = base64.b64encode(png()).decode()
    lines = [
        {"questionId": "q1", "image": "doc.png", "question": "What is the date?", "answers": ["12/15/88", "Dec 15"]},
        {"image": {"bytes": encoded, "path": None}, "question": "Highest bar?", "answer": "2019"},
        {"image": f"data:image/png;base64,{encoded}", "question": "Value?", "answer": 42},
    ]
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    examples = ExampleFile(path)
    assert examples.layout == "vqa"
    assert examples.example(0).id == "q1" and examples.example(0).references == ["12/15/88", "Dec 15"]
    assert examples.example(1).references == ["2019"] and examples.example(1).id == 1
    assert examples.example(2).references == ["42"]
    assert examples.example(1).source == f"{path}:2"
    for index in range(3):
        assert opened(examples.example(index))[0].size in ((40, 32), Image.open(tmp_path / "doc.png").size)


def test_captions_layout(tmp_path):
    path = write_parquet(tmp_path / "captions.parquet", [
        {"image": png(), "captions": ["A red circle.", "A round red shape."]},
    ])
    example = ExampleFile(path).example(0)
    assert ExampleFile(path).layout == "caption"
    assert example.target == "A red circle." and example.references == ["A red circle.", "A round red shape."]
    assert example.prompt_text == "<image>" + CAPTION_PROMPT
    single = write_parquet(tmp_path / "single.parquet", [{"image": png(), "caption": "A dot."}])
    assert ExampleFile(single).example(0).references == ["A dot."]


def test_blank_answers_are_never_the_target(tmp_path):
    """A blank answer beside real ones stays a reference but is not what training learns: VQA's most frequent
    answer and the first caption are taken among the non-blank ones."""
    path = tmp_path / "mixed.jsonl"
    rows = [{"image": "a.png", "question": "Q?", "answers": ["", "ok"]},
            {"image": "a.png", "question": "Q?", "answers": [" ", " ", "yes", "no"]}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    examples = ExampleFile(path)
    assert examples.example(0).target == "ok" and examples.example(0).references == ["", "ok"]
    assert examples.example(1).target == "yes" and examples.example(1).references == [" ", " ", "yes", "no"]
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image": "a.png", "captions": ["", "A dot."]}) + "\n")
    example = ExampleFile(captions).example(0)
    assert example.target == "A dot." and example.references == ["", "A dot."]
    assert LayoutSource(captions).record(0)[0]["messages"][-1]["content"] == "A dot."


def test_conversation_records_are_examples_too(tmp_path):
    draw_picture("red circle").save(tmp_path / "a.png")
    record = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "red"},
    ]}
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(record) + "\n")
    example = ExampleFile(path).example(0)
    assert ExampleFile(path).layout == "conversation"
    assert example.target == "red" and example.references == ["red"] and example.prompt_text == "<image>Colour?"


def test_tool_conversations_are_examples_whose_reference_is_the_call(tmp_path):
    """A conversation with tools is asked as the plain turns training and serving write (``tool_calls.converse``);
    its reference is the call text, which ``--metric tool_call_match`` reads back as calls."""
    from gemma3vl.evaluation.metrics import tool_call_match
    from gemma3vl.infer.tool_calls import instructions, parse_tools, ToolUse

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    record = {"tools": tools, "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris"}}}]},
    ]}
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(record) + "\n")
    examples = ExampleFile(path)
    assert examples.layout == "conversation"
    example = examples.example(0)
    assert example.references == ['[get_weather(city="Paris")]']
    assert [turn.role for turn in example.turns] == ["system", "user"]
    assert example.turns[0].content == instructions(ToolUse(tools=parse_tools(tools)))
    assert tool_call_match("```tool_code\nget_weather(city='Paris')\n```", example.references) == 1.0


def test_unrecognised_columns_are_a_clear_error(tmp_path):
    path = write_parquet(tmp_path / "odd.parquet", [{"picture": png(), "text": "x"}])
    with pytest.raises(Gemma3VLError, match=r"cannot tell the dataset layout from its columns \['picture', 'text'\]"):
        ExampleFile(path)
    with pytest.raises(Gemma3VLError, match=r"the vqa layout needs column\(s\) image, question or query, answers or "
                                            r"answer or label; the data has \['picture', 'text'\]"):
        ExampleFile(path, layout="vqa")
    with pytest.raises(Gemma3VLError, match="layout 'receipts' is not one of"):
        ExampleFile(path, layout="receipts")
    with pytest.raises(Gemma3VLError, match="no such dataset file"):
        ExampleFile(tmp_path / "missing.parquet")


def test_bad_rows_name_their_row(tmp_path):
    path = write_parquet(tmp_path / "cord.parquet", [
        {"image": png(), "ground_truth": "{not json"},
        {"image": png(), "ground_truth": json.dumps({"meta": {}})},
        {"image": None, "ground_truth": json.dumps({"gt_parse": {}})},
    ])
    examples = ExampleFile(path)
    with pytest.raises(BadRecord, match=rf"{path}:row 0: 'ground_truth' is not valid JSON"):
        examples.example(0)
    with pytest.raises(BadRecord, match=r"row 1: 'ground_truth' must be a JSON object with 'gt_parse' \(got \['meta'\]\)"):
        examples.example(1)
    with pytest.raises(BadRecord, match="row 2: 'image' must be a path, bytes"):
        examples.example(2)
    vqa = write_parquet(tmp_path / "vqa.parquet", [{"image": png(), "question": "q?", "answers": []}])
    with pytest.raises(BadRecord, match="'answers' must be a string or a non-empty list"):
        ExampleFile(vqa).example(0)


def test_parquet_directories_and_splits(tmp_path):
    data = tmp_path / "cord-v2" / "data"
    data.mkdir(parents=True)
    row = {"image": png(), "ground_truth": json.dumps({"gt_parse": {"total": {"total_price": "1"}}})}
    write_parquet(data / "train-00000-of-00002.parquet", [row, row])
    write_parquet(data / "train-00001-of-00002.parquet", [row])
    write_parquet(data / "test-00000-of-00001.parquet", [row])
    assert len(ExampleFile(tmp_path / "cord-v2")) == 4
    assert len(ExampleFile(tmp_path / "cord-v2", split="train")) == 3
    assert len(ExampleFile(tmp_path / "cord-v2", split="test")) == 1
    with pytest.raises(Gemma3VLError, match="no parquet file of split 'validation' among data/test-00000"):
        ExampleFile(tmp_path / "cord-v2", split="validation")


def test_training_reads_the_layouts(processor, tmp_path):  # noqa: F811
    """``data.layout`` turns rows into the same conversation the processor would get from a messages record."""
    image = png("yellow cross")
    path = write_parquet(tmp_path / "vqa.parquet", [
        {"image": {"bytes": image, "path": None}, "question": "What shape?", "answers": ["cross"] * 3},
    ])
    dataset = ConversationDataset(DataConfig(path, layout="vqa", shuffle=False, seq_length=512), processor)
    (sample,) = list(dataset)
    trained = [token for token, label in zip(sample.input_ids.tolist(), sample.labels.tolist()) if label != -100]
    tokenizer = processor.tokenizer
    assert tokenizer.decode(trained).startswith("cross")
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(io.BytesIO(image))},
                                             {"type": "text", "text": f"What shape?\n{VQA_SUFFIX}"}]},
                {"role": "assistant", "content": "cross"}]
    expected = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    assert sample.input_ids.tolist() == expected["input_ids"][0].tolist()
    assert LayoutSource(path, "auto").references(0) == ["cross"] * 3
    with pytest.raises(Gemma3VLError, match="data layout must be one of"):
        DataConfig(path, layout="receipts")


# ------------------------------------------------------------------------- hub datasets as they are published
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
VQAV2_ANSWERS = pa.list_(pa.struct([("answer", pa.string()), ("answer_confidence", pa.string()),
                                    ("answer_id", pa.int64())]))


def write_table(path, rows, schema):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(schema)), path)
    return path


def test_hub_vqa_datasets_read_with_their_own_columns(tmp_path):
    """lmms-lab/DocVQA, lmms-lab/VQAv2 and HuggingFaceM4/ChartQA, with their columns, types and nesting. Before,
    HuggingFaceM4/ChartQA (query, label) was 'cannot tell the dataset layout'."""
    image = {"bytes": png(), "path": None}
    docvqa = write_table(tmp_path / "docvqa" / "DocVQA" / "validation-00000-of-00001.parquet", [
        {"questionId": "49153", "question": "What is the date?", "question_types": ["form"], "image": image,
         "docId": 14465, "ucsf_document_id": "txpp0227", "ucsf_document_page_no": "10",
         "answers": ["12/15/88", "December 15, 1988"], "data_split": "val"}],
        [("questionId", pa.string()), ("question", pa.string()), ("question_types", pa.list_(pa.string())),
         ("image", IMAGE), ("docId", pa.int64()), ("ucsf_document_id", pa.string()),
         ("ucsf_document_page_no", pa.string()), ("answers", pa.list_(pa.string())), ("data_split", pa.string())])
    example = ExampleFile(docvqa.parent, split="validation").example(0)
    assert example.id == "49153" and example.references == ["12/15/88", "December 15, 1988"]
    assert example.prompt_text == f"<image>What is the date?\n{VQA_SUFFIX}"

    answers = ["2", "2", "two", "2", "3", "2", "2", "2", "2", "2"]
    vqav2 = write_table(tmp_path / "vqav2" / "data" / "validation-00000-of-00001.parquet", [
        {"question_type": "how many", "multiple_choice_answer": "2", "image_id": 42, "answer_type": "number",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)],
         "question_id": 42000, "question": "How many dogs?", "image": image}],
        [("question_type", pa.string()), ("multiple_choice_answer", pa.string()), ("answers", VQAV2_ANSWERS),
         ("image_id", pa.int64()), ("answer_type", pa.string()), ("question_id", pa.int64()),
         ("question", pa.string()), ("image", IMAGE)])
    example = ExampleFile(vqav2.parent.parent, split="validation").example(0)
    assert example.id == 42000 and example.references == answers and example.target == "2"

    chartqa = tmp_path / "chartqa" / "data"
    for split, label in (("train", ["Yes"]), ("val", ["41.5"])):
        write_table(chartqa / f"{split}-00000-of-00001-0f11003c77497969.parquet",
                    [{"image": image, "query": "Highest value?", "label": label, "human_or_machine": 0}],
                    [("image", IMAGE), ("query", pa.string()), ("label", pa.list_(pa.string())),
                     ("human_or_machine", pa.int64())])
    examples = ExampleFile(chartqa, split="val")
    assert examples.layout == "vqa" and len(examples) == 1
    example = examples.example(0)
    assert example.references == ["41.5"] and example.prompt_text == f"<image>Highest value?\n{VQA_SUFFIX}"
    # label is an answer only where there is no answers / answer column (not a class beside them)
    mixed = write_parquet(tmp_path / "mixed.parquet", [{"image": image, "question": "Q?", "answer": "x", "label": 3}])
    assert ExampleFile(mixed).example(0).references == ["x"]


def test_test_splits_without_answers_are_unlabelled_rows(tmp_path):
    """DocVQA / TextVQA / VQAv2 publish their test splits with null (or empty, or blank) answers: such a row is an
    :class:`Unlabelled` bad row, never an example scored against nothing, and data with no labelled row is an
    error saying so (before: "'answer' must be a string ..., got None", naming a column the data does not have,
    then 'no usable example')."""
    from gemma3vl.evaluation.layouts import Unlabelled
    from gemma3vl.evaluation.runner import read_examples

    image = {"bytes": png(), "path": None}
    schema = [("question_id", pa.int64()), ("question", pa.string()), ("image", IMAGE), ("answers", VQAV2_ANSWERS)]
    test = write_table(tmp_path / "vqav2" / "data" / "test-00000-of-00001.parquet",
                       [{"question_id": i, "question": "How many?", "image": image, "answers": value}
                        for i, value in enumerate((None, [], None))], schema)
    examples = ExampleFile(test.parent.parent, split="test")
    for index in range(3):
        with pytest.raises(Unlabelled, match=rf"row {index}: 'answers' .*no answer to score against .*test split"):
            examples.example(index)
    with pytest.raises(Gemma3VLError, match=r"none of the 3 rows read has an answer to score against .*"
                                            r"--split validation"):
        read_examples(test.parent.parent, split="test")
    blank = write_parquet(tmp_path / "textvqa-test.parquet",
                          [{"question_id": 1, "question": "What brand?", "image": image, "answers": [""] * 10}])
    with pytest.raises(Gemma3VLError, match="none of the 1 rows read has an answer"):
        read_examples(blank)
    # beside labelled rows: counted apart, the labelled ones read
    write_table(tmp_path / "vqav2" / "data" / "validation-00000-of-00001.parquet",
                [{"question_id": 9, "question": "How many?", "image": image,
                  "answers": [{"answer": "2", "answer_confidence": "yes", "answer_id": 1}]}], schema)
    found = read_examples(tmp_path / "vqav2")
    assert [example.id for example in found.examples] == [9] and found.unlabelled == 3 and len(found.skipped) == 3


def test_multiple_choice_data_is_refused_not_read_as_vqa(tmp_path):
    """lmms-lab/ai2d (question, options, answer = the option's index): read as VQA, the question was asked
    without its options and scored against "1"."""
    ai2d = write_parquet(tmp_path / "ai2d.parquet", [
        {"question": "Which stage is the larva?", "options": ["egg", "larva", "pupa", "adult"], "answer": "1",
         "image": {"bytes": png(), "path": None}}])
    with pytest.raises(Gemma3VLError, match=r"multiple-choice data \(column\(s\) options beside the question\)"):
        ExampleFile(ai2d)
    mmbench = write_parquet(tmp_path / "mmbench.parquet", [
        {"index": 0, "question": "Which?", "hint": None, "A": "a", "B": "b", "C": "c", "D": "d", "answer": "A",
         "image": png()}])
    with pytest.raises(Gemma3VLError, match=r"column\(s\) A, B, C, D beside"):
        ExampleFile(mmbench)


def test_split_of_a_single_file_is_not_taken_from_a_directory_further_up(tmp_path):
    """A train file anywhere under a directory named 'test' (~/test/cord/train-....parquet) was taken as a file
    of split 'test'."""
    train = tmp_path / "test" / "cord" / "train-00000-of-00001.parquet"
    train.parent.mkdir(parents=True)
    write_parquet(train, [{"image": png(), "ground_truth": json.dumps({"gt_parse": {}})}])
    with pytest.raises(Gemma3VLError, match="is one file, not a file of split 'test'"):
        ExampleFile(train, split="test")
    assert len(ExampleFile(train, split="train")) == 1
    in_split_directory = tmp_path / "data" / "test" / "0000.parquet"  # refs/convert/parquet's <split>/ files
    in_split_directory.parent.mkdir(parents=True)
    write_parquet(in_split_directory, [{"image": png(), "ground_truth": json.dumps({"gt_parse": {}})}])
    assert len(ExampleFile(in_split_directory, split="test")) == 1


def test_a_directory_without_parquet_files_says_how_to_give_json(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Gemma3VLError, match=r"empty: no parquet files in this directory$"):
        ExampleFile(tmp_path / "empty")
    (tmp_path / "qa" / "v1").mkdir(parents=True)
    (tmp_path / "qa" / "v1" / "val.jsonl").write_text(json.dumps({"image": "a.png", "question": "q?", "answer": "a"}))
    with pytest.raises(Gemma3VLError, match=r"a JSONL or JSON file is given as --data itself, e\.g\. "
                                            r".*qa/v1/val\.jsonl"):
        ExampleFile(tmp_path / "qa")
    assert len(ExampleFile(tmp_path / "qa" / "v1" / "val.jsonl")) == 1
