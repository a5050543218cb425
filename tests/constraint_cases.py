"""The structured-output cases shared by tests/test_constraints.py and the constraint benchmarks:
three JSON schemas (flat; nested with arrays and enums; string patterns), regexes (one of CJK
characters, which World tokens split into partial UTF-8 pieces) and a Lark grammar.

Every string and number is bounded (maxLength, enums, integer ranges, bounded repetitions), so a
random model, which never chooses to close a string by itself, still completes each case within a
few dozen tokens: the cases test the constraint, not the model's taste.
"""

from __future__ import annotations

FLAT = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "active"],
    "additionalProperties": False,
}

NESTED = {
    "type": "object",
    "properties": {
        "user": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 0, "maximum": 9999},
                "role": {"enum": ["admin", "editor", "viewer"]},
            },
            "required": ["id", "role"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "points": {
            "type": "array",
            "items": {"type": "array", "items": {"type": "integer", "minimum": -99, "maximum": 99}, "minItems": 2, "maxItems": 2},
            "maxItems": 2,
        },
    },
    "required": ["user", "tags", "points"],
    "additionalProperties": False,
}

PATTERNS = {
    "type": "object",
    "properties": {
        "date": {"type": "string", "pattern": "^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
        "lang": {"type": "string", "pattern": "^[a-z]{2}(_[A-Z]{2})?$"},
    },
    "required": ["date", "code", "lang"],
    "additionalProperties": False,
}

SCHEMAS = {"flat": FLAT, "nested": NESTED, "patterns": PATTERNS}

REGEXES = {
    "date": r"[0-9]{4}-(0[1-9]|1[0-2])-[0-9]{2}",
    "cjk": "[\u4e00-\u9fff]{2,4}",  # 3-byte characters: World has tokens for single bytes and pieces
}

# Lark, the format llguidance reads natively and the `lark` package parses (non-recursive, bounded)
GRAMMAR = r"""
start: pair (";" pair)~0..2
pair: KEY "=" value
value: NUMBER | WORD
KEY: /[a-z]{1,6}/
NUMBER: /[0-9]{1,4}/
WORD: /"[a-z]{0,6}"/
"""

# the same language in llama.cpp's GBNF (the `grammar` constraint converts it; xgrammar reads it)
GRAMMAR_GBNF = r"""
root ::= pair (";" pair){0,2}
pair ::= key "=" value
value ::= number | word
key ::= [a-z]{1,6}
number ::= [0-9]{1,4}
word ::= "\"" [a-z]{0,6} "\""
"""
