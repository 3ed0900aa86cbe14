"""The flow as a networkx DiGraph: producers -> topics -> subscribers -> topics.

Nodes are `(kind, name)` tuples with kind `producer`, `topic` or `subscriber`. Edge kinds:
`publishes` (producer or subscriber to topic), `delivers` (topic to subscriber) and
`dead_letter` (subscriber to its dead-letter topic).
"""

from __future__ import annotations

import networkx as nx

from flowrun.spec import FlowSpec

Node = tuple[str, str]


def topic(name: str) -> Node:
    return ("topic", name)


def subscriber(name: str) -> Node:
    return ("subscriber", name)


def producer(name: str) -> Node:
    return ("producer", name)


def build_graph(spec: FlowSpec) -> nx.DiGraph:
    """Build the flow graph; references to undeclared topics still get a topic node."""
    graph = nx.DiGraph(name=spec.name)

    for name in spec.topics:
        graph.add_node(topic(name), declared=True)

    for name, producer_spec in spec.producers.items():
        graph.add_node(producer(name), plugin=producer_spec.plugin)
        for target in producer_spec.publishes:
            graph.add_edge(producer(name), topic(target), kind="publishes")

    for name, subscriber_spec in spec.subscribers.items():
        graph.add_node(subscriber(name), plugin=subscriber_spec.plugin, mode=subscriber_spec.mode.value,
                       ack=subscriber_spec.ack.value)
        graph.add_edge(topic(subscriber_spec.topic), subscriber(name), kind="delivers")
        for target in subscriber_spec.publishes:
            graph.add_edge(subscriber(name), topic(target), kind="publishes")
        if subscriber_spec.dead_letter:
            graph.add_edge(subscriber(name), topic(subscriber_spec.dead_letter), kind="dead_letter")

    for node, data in graph.nodes(data=True):
        if node[0] == "topic":
            data.setdefault("declared", False)
    return graph


def topic_cycles(graph: nx.DiGraph, order: list[Node]) -> list[list[Node]]:
    """Return each elementary cycle, starting at its node earliest in `order`, in a stable order.

    A subscriber that dead-letters into its own topic is left out: validate reports it on its own.
    """
    rank = {node: index for index, node in enumerate(order)}
    cycles = []
    for cycle in nx.simple_cycles(graph):
        if len(cycle) == 2 and all(graph.edges[a, b]["kind"] == "dead_letter" or graph.edges[a, b]["kind"] == "delivers"
                                   for a, b in zip(cycle, cycle[1:] + cycle[:1])):
            continue
        start = min(range(len(cycle)), key=lambda index: rank.get(cycle[index], len(rank)))
        cycles.append(cycle[start:] + cycle[:start])
    return sorted(cycles, key=lambda cycle: [rank.get(node, len(rank)) for node in cycle])


def label(node: Node) -> str:
    return f"{node[0]} '{node[1]}'"


def _subscription_label(data: dict[str, object]) -> str:
    return f"{data.get('mode', '')}, ack {data.get('ack', '')}"


def node_ids(graph: nx.DiGraph) -> dict[Node, str]:
    """Identifiers safe for Mermaid and DOT, unique even when names differ only in punctuation."""
    ids: dict[Node, str] = {}
    taken: set[str] = set()
    for node in sorted(graph.nodes):
        kind, name = node
        base = f"{kind}_" + "".join(character if character.isalnum() else "_" for character in name)
        candidate, suffix = base, 2
        while candidate in taken:
            candidate, suffix = f"{base}_{suffix}", suffix + 1
        taken.add(candidate)
        ids[node] = candidate
    return ids


def to_mermaid(graph: nx.DiGraph) -> str:
    """Render the flow as a Mermaid flowchart: producers, topics, subscribers, dead-letter edges."""
    ids = node_ids(graph)
    _stable_id = ids.__getitem__
    lines = ["flowchart LR"]
    for node, data in sorted(graph.nodes(data=True)):
        node_id = _stable_id(node)
        kind, name = node
        if kind == "producer":
            lines.append(f'    {node_id}[/"{name}"/]')
        elif kind == "topic":
            lines.append(f'    {node_id}(["{name}"])')
        else:
            lines.append(f'    {node_id}["{name}<br/><small>{data.get("plugin", "")}</small>"]')

    for source, target, data in sorted(graph.edges(data=True)):
        kind = data.get("kind")
        if kind == "delivers":
            label = _subscription_label(graph.nodes[target])
            lines.append(f"    {_stable_id(source)} -->|{label}| {_stable_id(target)}")
        elif kind == "dead_letter":
            lines.append(f"    {_stable_id(source)} -.->|dead letter| {_stable_id(target)}")
        else:
            lines.append(f"    {_stable_id(source)} --> {_stable_id(target)}")
    return "\n".join(lines) + "\n"


def to_dot(graph: nx.DiGraph) -> str:
    """Render the flow in Graphviz DOT."""
    ids = node_ids(graph)
    _stable_id = ids.__getitem__
    shapes = {"producer": "parallelogram", "topic": "cylinder", "subscriber": "box"}
    lines = [f'digraph "{graph.graph.get("name", "flow")}" {{', "    rankdir=LR;", '    node [fontname="Helvetica"];', '    edge [fontname="Helvetica", fontsize=10];']
    for node, data in sorted(graph.nodes(data=True)):
        kind, name = node
        label = name if kind != "subscriber" else f"{name}\\n{data.get('plugin', '')}"
        lines.append(f'    {_stable_id(node)} [label="{_dot_escape(label)}", shape={shapes[kind]}];')

    for source, target, data in sorted(graph.edges(data=True)):
        kind = data.get("kind")
        attributes = ""
        if kind == "delivers":
            attributes = f' [label="{_subscription_label(graph.nodes[target])}"]'
        elif kind == "dead_letter":
            attributes = ' [label="dead letter", style=dashed, color=red]'
        lines.append(f"    {_stable_id(source)} -> {_stable_id(target)}{attributes};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_escape(text: str) -> str:
    return text.replace('"', '\\"')
