"""Replies for the fake OpenAI server that drive real runs of both engines (record, replay, cache tests):
the document engine's root writes CELLS[iteration], its sub-model answers each prompt by its tail; the repo
engine's agents spawn a depth-2 tree of concurrent sub-agents."""

import re

CELLS = ["print('Q', llm_query('third?'))\nprint('B', llm_query_batched(['b1?', 'b2?', 'b3?']))",
         "SUBMIT(counts={'a': 1})"]
DOCUMENT_TASK = ["task=needles", "task.documents=2", "task.doc_chars=200", "task.needles=2"]
ITERATION = re.compile(r"\[\[ ## iteration ## \]\]\s*(\d+)\s*/")


def fields(**values):
    return "".join(f"[[ ## {k} ## ]]\n{v}\n\n" for k, v in values.items()) + "[[ ## completed ## ]]"


def chat(request):
    return "\n".join(str(m.get("content")) for m in request["messages"])


def iteration_of(request):
    """Which iteration of the document engine's root agent this request is (1-based), or None for another
    model call (a sub-agent's)."""
    found = ITERATION.findall(chat(request))
    return int(found[-1]) if found else None


def root_for(cells):
    """The document engine's root model: cell N at iteration N (the last one repeated)."""
    def reply(request):
        index = iteration_of(request) - 1
        return fields(reasoning="work", code=f"```python\n{cells[min(index, len(cells) - 1)]}\n```")
    return reply


document_root = root_for(CELLS)


def document_sub(request):
    return "answer to " + chat(request)[-6:]


def repo_tree(request):
    """A depth-2 tree: the root and each child spawn two sub-agents at once, leaves answer with their task."""
    system, last = request["messages"][0]["content"], request["messages"][-1]["content"]
    if "depth 2 of" in system:
        return "```python\nFINAL('leaf: ' + task[-40:])\n```"
    if "[iteration 1/" in last:
        return "```python\nprint(rlm_query_batched([task[-30:] + ' / part A', task[-30:] + ' / part B']))\n```"
    return "```python\nFINAL('done' if depth == 0 else 'mid: ' + task[-40:])\n```"


def tree_shape(node):
    """A run tree without times and ids: kinds, tasks, results, iterations' code and output."""
    return {"kind": node["kind"], "task": node["task"], "result": node.get("result"), "status": node["status"],
            "iterations": [(i.get("code"), i.get("stdout")) for i in node["iterations"]],
            "children": sorted((tree_shape(c) for c in node["children"]), key=repr)}
