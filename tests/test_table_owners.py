"""One owner per table (STYLE.md): every SQLite table is written by one module, and others call its
functions. Checked like the layering, on the code: each write (a sqlite-utils ``db["t"].insert`` /
``update`` / ``upsert`` / ``delete`` ..., or SQL text ``insert into t`` / ``update t set`` /
``delete from t``) is traced to its module, and each table must have exactly the owner listed here.
Schema changes (``create``, ``create_index``, ``transform`` ...) belong to the migration modules."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("assistant", "feedback", "trainer", "evals", "tuneloop")

OWNERS = {
    "sessions": "feedback.turns",
    "turns": "feedback.turns",
    "votes": "feedback.store",
    "corrections": "feedback.store",
    "review_actions": "feedback.store",
    "staff_users": "feedback.auth",
    "signin_attempts": "feedback.auth",
    "staff_sessions": "feedback.auth",
    "examples": "feedback.examples",
    "embeddings": "feedback.dedupe",
    "dataset_versions": "feedback.datasets",
    "knowledge": "feedback.knowledge",
    "api_keys": "feedback.apikeys",
    "erasures": "feedback.privacy",
    # The staff view writes marks, and the app may import only assistant and feedback: both review
    # tables are feedback's (feedback.schema 0003_human_review); evals.review only picks the pairs.
    "review_pairs": "feedback.review",
    "review_marks": "feedback.review",
    "eval_reports": "evals.evaluate",
    "gate_decisions": "evals.gate",
    "retrain_runs": "tuneloop.pipeline",
}
MIGRATION_MODULES = {"feedback.schema", "evals.schema"}

ROW_WRITES = {"insert", "insert_all", "upsert", "upsert_all", "update", "delete", "delete_where", "lookup"}
SCHEMA_WRITES = {"create", "create_index", "transform", "add_column", "add_foreign_key", "drop", "rename_table"}
SQL_WRITE = re.compile(
    r'\b(?:insert(?:\s+or\s+\w+)?\s+into|replace\s+into|delete\s+from)\s+"?(\w+)"?|\bupdate\s+"?(\w+)"?\s+set\b',
    re.IGNORECASE,
)


def source_files() -> list[Path]:
    return [REPO / "app.py"] + [file for package in PACKAGES for file in sorted((REPO / package).rglob("*.py"))]


def module_name(file: Path) -> str:
    return ".".join(file.relative_to(REPO).with_suffix("").parts)


def docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            for statement in node.body:
                if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
                    found.add(id(statement.value))
    return found


def writes_of(file: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """``(kind, table)`` of every row write in ``file`` (kind "rows" or "schema"), and the lines that
    write through a table name that is not written out."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    skip = docstrings(tree)
    found, unnamed = [], []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Subscript) and node.func.attr in ROW_WRITES | SCHEMA_WRITES):
            kind = "rows" if node.func.attr in ROW_WRITES else "schema"
            key = node.func.value.slice
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                found.append((kind, key.value))
            else:
                unnamed.append(f"{file}:{node.lineno}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            found += [("rows", into or updated) for into, updated in SQL_WRITE.findall(node.value)]
    return found, unnamed


def test_each_table_is_written_by_its_one_owner():
    writers: dict[str, set[str]] = defaultdict(set)
    schema_changes, unnamed = [], []
    for file in source_files():
        found, unknown = writes_of(file)
        unnamed += unknown
        for kind, table in found:
            if kind == "rows":
                writers[table].add(module_name(file))
            elif module_name(file) not in MIGRATION_MODULES:
                schema_changes.append(f"{module_name(file)} changes the schema of {table}")
    assert not unnamed, f"writes through a table name that is not written out: {unnamed}"
    assert not schema_changes, "\n".join(schema_changes)
    shared = {table: sorted(modules) for table, modules in writers.items() if len(modules) > 1}
    assert not shared, f"tables written by more than one module: {shared}"
    assert {table: modules.pop() for table, modules in writers.items()} == {
        table: owner for table, owner in OWNERS.items() if table in writers}
    assert set(writers) <= set(OWNERS), f"tables without a listed owner: {sorted(set(writers) - set(OWNERS))}"


def test_every_table_of_the_schema_has_an_owner():
    from evals import schema

    # sqlite_sequence is SQLite's own (it keeps AUTOINCREMENT counters, e.g. of knowledge's ids).
    tables = set(schema.connect(":memory:").table_names()) - {"_sqlite_migrations", "sqlite_sequence"}
    assert tables == set(OWNERS)


def test_the_scan_sees_each_kind_of_write(tmp_path):
    # The check above is only as good as what it finds: each form of write is seen, docstrings are not.
    file = tmp_path / "sample.py"
    file.write_text(
        '"""Nothing to insert into notes here."""\n'
        'def f(db, name):\n'
        '    db["a"].insert({})\n'
        '    db["b"].upsert({}, pk="id")\n'
        '    db.execute("insert or ignore into c (x) values (?)")\n'
        '    db.execute("UPDATE d SET x = 1")\n'
        '    db.execute("delete from e where 1")\n'
        '    db["f"].create({"id": int})\n'
        '    db[name].update(1, {})\n',
        encoding="utf-8",
    )
    found, unnamed = writes_of(file)
    assert sorted(found) == [("rows", "a"), ("rows", "b"), ("rows", "c"), ("rows", "d"), ("rows", "e"), ("schema", "f")]
    assert unnamed == [f"{file}:9"]
