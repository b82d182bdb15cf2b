"""The Go text/template engine: each construct against the output Go's documentation gives
it, Go's error messages with their positions, and bounds on runaway templates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from herd.errors import TemplateError
from herd.template.gotemplate import GoTemplate, GoTemplateError
from herd.template.gotemplate.gofmt import sprint, sprintf, sprintln
from herd.template.gotemplate.gojson import marshal


@dataclass
class Msg:
    GO_TYPE: ClassVar[str] = "*template.Msg"
    Role: str
    Content: str
    hidden: str = ""


class Stringer(dict[str, Any]):
    GO_METHODS: ClassVar[dict[str, str]] = {"String": "go_string", "Upper": "upper"}

    def go_string(self) -> str:
        return "S!"

    def upper(self, s: str) -> str:
        return s.upper()


DATA: dict[str, Any] = {
    "Name": "herd",
    "Zero": 0,
    "Empty": "",
    "List": ["a", "b", "c"],
    "Nums": [3, 1, 2],
    "Map": {"b": 2, "a": 1, "c": 3},
    "Nested": {"Inner": {"Deep": "found"}},
    "Msgs": [Msg("system", "Be brief."), Msg("user", "Hi"), Msg("assistant", "Hello")],
    "True": True,
    "Float": 1.5,
    "Big": 1e6,
    "S": Stringer(),
    "Fn": lambda a, b: a + b,
}

CASES = [
    # text, actions, trimming, comments
    ("plain", "hello", "hello"),
    ("field", "{{ .Name }}", "herd"),
    ("nested-field", "{{ .Nested.Inner.Deep }}", "found"),
    ("missing-key", "{{ .Nope }}|{{ .Nope.Deeper }}", "<no value>|<no value>"),
    ("struct-field", "{{ (index .Msgs 1).Content }}", "Hi"),
    ("dot", "{{ .List }}", "[a b c]"),
    ("map-print", "{{ .Map }}", "map[a:1 b:2 c:3]"),
    ("trim-left", "a  \n {{- .Name }}", "aherd"),
    ("trim-right", "{{ .Name -}} \n\t b", "herdb"),
    ("trim-both", "x {{- /* c */ -}} y", "xy"),
    ("comment", "a{{/* a\nmulti-line comment */}}b", "ab"),
    ("minus-number", "{{-3}}", "-3"),
    # literals
    ("string", '{{ "a\\tb" }}|{{ `raw\\n` }}', "a\tb|raw\\n"),
    ("numbers", "{{ 42 }} {{ 0x1F }} {{ 0o17 }} {{ 0b101 }} {{ 1_000 }}", "42 31 15 5 1000"),
    ("floats", "{{ 1.5 }} {{ 1e3 }} {{ .5 }} {{ 1e6 }} {{ .Big }}", "1.5 1000 0.5 1e+06 1e+06"),
    ("char", "{{ 'a' }} {{ '\\n' }}", "97 10"),
    ("complex", "{{ 1+2i }}", "(1+2i)"),
    ("bool-nil", "{{ true }} {{ print nil }}", "true <nil>"),
    # variables
    ("declare", "{{ $x := .Name }}{{ $x }}", "herd"),
    ("assign", "{{ $x := 1 }}{{ if true }}{{ $x = 2 }}{{ end }}{{ $x }}", "2"),
    ("scope", "{{ $x := 1 }}{{ with .Name }}{{ $x := 9 }}{{ $x }}{{ end }}{{ $x }}", "91"),
    ("dollar", "{{ range .List }}{{ $.Name }}{{ end }}", "herdherdherd"),
    ("var-field", "{{ $m := .Nested }}{{ $m.Inner.Deep }}", "found"),
    # if / with
    ("if", "{{ if .True }}yes{{ end }}", "yes"),
    ("if-else", "{{ if .Zero }}yes{{ else }}no{{ end }}", "no"),
    ("else-if", "{{ if .Zero }}a{{ else if .Empty }}b{{ else if .List }}c{{ end }}", "c"),
    ("truth", "{{ if .Map }}m{{ end }}{{ if .S }}s{{ end }}{{ if index .Msgs 0 }}p{{ end }}", "mp"),
    ("falsy", "{{ if or .Zero .Empty .Nope 0.0 false }}t{{ else }}f{{ end }}", "f"),
    ("with", "{{ with .Nested.Inner }}{{ .Deep }}{{ end }}", "found"),
    ("with-else", "{{ with .Empty }}x{{ else }}{{ .Name }}{{ end }}", "herd"),
    ("else-with", "{{ with .Zero }}z{{ else with .Name }}{{ . }}{{ end }}", "herd"),
    ("with-var", '{{ with $x := "out" | printf "%q" }}{{ $x }}{{ end }}', '"out"'),
    # range
    ("range", "{{ range .List }}<{{ . }}>{{ end }}", "<a><b><c>"),
    ("range-index", "{{ range $i, $e := .List }}{{ $i }}={{ $e }} {{ end }}", "0=a 1=b 2=c "),
    ("range-one-var", "{{ range $e := .List }}{{ $e }}{{ end }}", "abc"),
    ("range-map-sorted", "{{ range $k, $v := .Map }}{{ $k }}{{ $v }}{{ end }}", "a1b2c3"),
    ("range-else", "{{ range .Zero }}x{{ else }}none{{ end }}{{ range $.Msgs }}{{ end }}", "none"),
    ("range-nil", "{{ range .Nope }}x{{ else }}nil{{ end }}", "nil"),
    ("range-int", "{{ range 3 }}{{ . }}{{ end }}", "012"),
    (
        "break-continue",
        "{{ range .Nums }}{{ if eq . 1 }}{{ continue }}{{ end }}{{ if eq . 2 }}{{ break }}"
        "{{ end }}{{ . }}{{ end }}",
        "3",
    ),
    (
        "range-structs",
        "{{ range .Msgs }}{{ .Role }}:{{ .Content }};{{ end }}",
        "system:Be brief.;user:Hi;assistant:Hello;",
    ),  # fmt: skip
    (
        "range-assign",
        "{{ $i := 0 }}{{ $e := 0 }}{{ range $i, $e = .List }}{{ end }}{{ $i }}{{ $e }}",
        "2c",
    ),  # fmt: skip
    # define / template / block
    ("define", '{{ define "T" }}[{{ . }}]{{ end }}{{ template "T" .Name }}', "[herd]"),
    ("template-nil-dot", '{{ define "T" }}{{ . }}{{ end }}{{ template "T" }}', "<no value>"),
    ("block", '{{ block "B" .List }}{{ len . }}{{ end }}', "3"),
    ("no-dynamic-scope", '{{ define "T" }}{{ $ }}{{ end }}{{ $x := 1 }}{{ template "T" 5 }}', "5"),
    # pipelines and functions
    ("pipeline", '{{ "put" | printf "%s%s" "out" | printf "%q" }}', '"output"'),
    ("parens", '{{ printf "%q" (print "out" "put") }}', '"output"'),
    ("chain-on-parens", "{{ (index .Msgs 2).Role }}", "assistant"),
    ("and-or", '{{ and 1 2 }} {{ and 0 2 }} {{ or 0 "" 3 }} {{ or 0 "" }}', "2 0 3 "),
    ("short-circuit", "{{ and false (index .List 9) }}{{ or true (index .List 9) }}", "falsetrue"),
    ("not", "{{ not 0 }} {{ not .List }}", "true false"),
    ("len", '{{ len .List }} {{ len .Map }} {{ len "héllo" }}', "3 3 6"),
    (
        "index",
        '{{ index .List 1 }} {{ index .Map "c" }} {{ index .Nested "Inner" "Deep" }}',
        "b 3 found",
    ),  # fmt: skip
    ("index-missing-key", '{{ index .Map "zz" }}', "<no value>"),
    ("index-string", '{{ index "abc" 1 }}', "98"),
    (
        "slice",
        '{{ slice .List 1 }} {{ slice .List 1 2 }} {{ slice "hello" 1 3 }} {{ slice .List }}',
        "[b c] [b] el [a b c]",
    ),  # fmt: skip
    ("eq-multi", '{{ eq .Name "x" "herd" }} {{ eq 1 2 }}', "true false"),
    (
        "compare",
        '{{ lt 1 2 }} {{ le 2 2 }} {{ gt 1.5 2.5 }} {{ ge "b" "a" }} {{ ne 1 1 }}',
        "true true false true false",
    ),  # fmt: skip
    ("eq-nil", "{{ eq .Nope nil }} {{ eq .Name nil }}", "true false"),
    ("print", '{{ print 1 2 "a" "b" 3 }}', "1 2ab3"),
    ("println", '{{ println "a" 1 }}', "a 1\n"),
    (
        "printf",
        '{{ printf "%5.2f|%-3d|%03d|%x|%q|%v|%t" 3.14159 7 7 255 "hi" .Nums true }}',
        ' 3.14|7  |007|ff|"hi"|[3 1 2]|true',
    ),  # fmt: skip
    ("printf-errors", '{{ printf "%d %s" "x" }}', "%!d(string=x) %!s(MISSING)"),
    ("html", '{{ html "<a href=\'x\'>&\\"" }}', "&lt;a href=&#39;x&#39;&gt;&amp;&#34;"),
    ("js", '{{ js "it\'s <b> \\"q\\" =" }}', 'it\\\'s \\u003Cb\\u003E \\"q\\" \\u003D'),
    ("urlquery", '{{ urlquery "a b&c/é" }}', "a+b%26c%2F%C3%A9"),
    ("html-nil", "{{ html .Nope }}", "&lt;no value&gt;"),
    ("call", "{{ call .Fn 2 3 }}", "5"),
    ("stringer", '{{ .S }} {{ printf "%s|%v" .S .S }}', "S! S!|S!"),
    ("method", '{{ .S.Upper "x" }}', "X"),
]


@pytest.mark.parametrize("source, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_construct(source: str, expected: str) -> None:
    assert GoTemplate(source, "t").execute(DATA) == expected


PARSE_ERRORS = [
    ("unclosed-action", "{{ .Name ", "template: t:1:9: unclosed action"),
    ("unclosed-action-line", "a\n{{ .Name\n", "template: t:3:0: unclosed action started at t:2"),
    ("undefined-function", "x\n{{ nope 1 }}", 'template: t:2:3: function "nope" not defined'),
    ("undefined-variable", "{{ $x }}", 'template: t:1:6: undefined variable "$x"'),
    ("unexpected-eof", "{{ if .A }}x", "template: t:1:12: unexpected EOF"),
    ("unexpected-end", "{{ end }}", "template: t:1:7: unexpected {{end}}"),
    ("unexpected-else", "{{ else }}", "template: t:1:8: unexpected {{else}}"),
    ("break-outside", "{{ break }}", "template: t:1:9: {{break}} outside {{range}}"),
    (
        "continue-in-else",
        "{{ range .L }}{{ else }}{{ continue }}{{ end }}",
        "template: t:1:36: {{continue}} outside {{range}}",
    ),  # fmt: skip
    ("empty-pipeline", "{{ if }}{{ end }}", "template: t:1:6: missing value for if"),
    ("empty-action", "{{ }}", "template: t:1:3: missing value for command"),
    (
        "non-executable",
        "{{ .A | 3 }}",
        "template: t:1:10: non executable command in pipeline stage 2",
    ),
    ("bad-char", "{{ .A# }}", "template: t:1:3: bad character U+0023 '#'"),
    ("unterminated-string", '{{ "abc }}', "template: t:1:3: unterminated quoted string"),
    ("unclosed-comment", "{{/* x", "template: t:1:2: unclosed comment"),
    ("comment-delim", "{{/* x */ }}", "template: t:1:2: comment ends before closing delimiter"),
    ("bad-number", "{{ 3k }}", 'template: t:1:3: bad number syntax: "3k"'),
    ("char-malformed", "{{ 'ab' }}", "template: t:1:3: malformed character constant: 'ab'"),
    ("term-dot", '{{ "x".A }}', 'template: t:1:8: unexpected . after term "\\"x\\""'),
    ("unclosed-paren", "{{ (1 }}", "template: t:1:6: unclosed left paren"),
    ("right-paren", "{{ 1) }}", "template: t:1:4: unexpected right paren"),
    (
        "define-name",
        "{{ define x }}{{ end }}",
        'template: t:1:10: unexpected "x" in define clause',
    ),  # fmt: skip
    (
        "redefinition",
        '{{ define "a" }}1{{ end }}{{ define "a" }}2{{ end }}',
        'template: t:1:50: template: multiple definition of template "a"',
    ),  # fmt: skip
    ("else-junk", "{{ if 1 }}{{ else 2 }}{{ end }}", 'template: t:1:18: unexpected "2" in else'),
    (
        "range-decl",
        "{{ range $a, $b, $c := .L }}{{ end }}",
        "template: t:1:15: too many declarations in range",
    ),  # fmt: skip
    (
        "expected-end",
        "{{ if 1 }}{{ else }}{{ else }}{{ end }}",
        "template: t:1:28: expected end; found {{else}}",
    ),  # fmt: skip
]


@pytest.mark.parametrize(
    "source, message", [c[1:] for c in PARSE_ERRORS], ids=[c[0] for c in PARSE_ERRORS]
)
def test_parse_error(source: str, message: str) -> None:
    with pytest.raises(GoTemplateError) as err:
        GoTemplate(source, "t")
    assert str(err.value) == message
    assert isinstance(err.value, TemplateError)
    line, col = message.split(":")[2:4]
    assert (err.value.line, err.value.col) == (int(line), int(col))


EXEC_ERRORS = [
    (
        "field-of-string",
        "{{ .Name.X }}",
        "t:1:8",
        "<.Name.X>",
        "can't evaluate field X in type string",
    ),  # fmt: skip
    (
        "field-of-struct",
        "{{ range .Msgs }}{{ .Nope }}{{ end }}",
        "t:1:20",
        "<.Nope>",
        "can't evaluate field Nope in type *template.Msg",
    ),  # fmt: skip
    (
        "unexported",
        "{{ range .Msgs }}{{ .hidden }}{{ end }}",
        "t:1:20",
        "<.hidden>",
        "hidden is an unexported field of struct type *template.Msg",
    ),  # fmt: skip
    ("map-args", "{{ .Name 1 }}", "t:1:3", "<.Name>", "Name is not a method but has arguments"),
    (
        "index-range",
        "{{ index .List 5 }}",
        "t:1:3",
        "<index>",
        "error calling index: index out of range: 5",
    ),  # fmt: skip
    (
        "index-type",
        '{{ index .List "a" }}',
        "t:1:3",
        "<index>",
        "error calling index: cannot index slice/array with type string",
    ),  # fmt: skip
    (
        "index-nil",
        "{{ index .Nope 1 }}",
        "t:1:3",
        "<index>",
        "error calling index: index of untyped nil",
    ),  # fmt: skip
    (
        "slice-bad",
        "{{ slice .List 2 1 }}",
        "t:1:3",
        "<slice>",
        "error calling slice: invalid slice index: 2 > 1",
    ),  # fmt: skip
    ("len-int", "{{ len 3 }}", "t:1:3", "<len>", "error calling len: len of type int"),
    (
        "eq-types",
        '{{ eq 1 "a" }}',
        "t:1:3",
        "<eq>",
        "error calling eq: incompatible types for comparison: int and string",
    ),  # fmt: skip
    (
        "lt-bool",
        "{{ lt true false }}",
        "t:1:3",
        "<lt>",
        "error calling lt: invalid type for comparison",
    ),  # fmt: skip
    (
        "eq-missing",
        "{{ eq 1 }}",
        "t:1:3",
        "<eq>",
        "error calling eq: missing argument for comparison",
    ),
    ("wrong-args", "{{ not 1 2 }}", "t:1:3", "<not>", "wrong number of args for not: want 1 got 2"),
    ("printf-format", "{{ printf 3 }}", "t:1:10", "<3>", "expected string; found 3"),
    (
        "printf-value",
        "{{ printf .Zero }}",
        "t:1:10",
        "<.Zero>",
        "wrong type for value; expected string; got int",
    ),  # fmt: skip
    (
        "range-string",
        "{{ range .Name }}{{ end }}",
        "t:1:9",
        "<.Name>",
        "range can't iterate over herd",
    ),  # fmt: skip
    (
        "range-int-two",
        "{{ range $i, $e := 3 }}{{ end }}",
        "t:1:19",
        "<3>",
        "can't use 3 to iterate over more than one variable",
    ),  # fmt: skip
    ("not-function", "{{ 3 4 }}", "t:1:3", "<3>", "can't give argument to non-function 3"),
    ("nil-command", "{{ nil }}", "t:1:3", "<nil>", "nil is not a command"),
    (
        "no-template",
        '{{ template "x" }}',
        "t:1:12",
        '<{{template "x"}}>',
        'template "x" not defined',
    ),
    (
        "call-non-function",
        "{{ call .Name }}",
        "t:1:3",
        "<call>",
        "error calling call: non-function .Name of type string",
    ),  # fmt: skip
    (
        "print-func",
        "{{ .Fn }}",
        "t:1:3",
        "<{{.Fn}}>",
        "can't print {{.Fn}} of type func(...) interface {}",
    ),  # fmt: skip
]


@pytest.mark.parametrize(
    "source, where, context, message",
    [c[1:] for c in EXEC_ERRORS],
    ids=[c[0] for c in EXEC_ERRORS],
)
def test_exec_error(source: str, where: str, context: str, message: str) -> None:
    template = GoTemplate(source, "t")
    with pytest.raises(GoTemplateError) as err:
        template.execute(DATA)
    assert str(err.value) == f'template: {where}: executing "t" at {context}: {message}'


def test_error_in_defined_template_names_it() -> None:
    template = GoTemplate('{{ define "inner" }}\n  {{ .X.Y }}{{ end }}{{ template "inner" 1 }}', "")
    with pytest.raises(GoTemplateError) as err:
        template.execute({})
    assert str(err.value) == (
        'template: :2:7: executing "inner" at <.X.Y>: can\'t evaluate field X in type int'
    )
    assert (err.value.line, err.value.col) == (2, 7)  # Go points at the chain's last field


def test_missingkey_error() -> None:
    with pytest.raises(GoTemplateError, match='map has no entry for key "Nope"'):
        GoTemplate("{{ .Nope }}").execute({}, missingkey="error")


RUNAWAY = [
    ("range-int", "{{ range 100000000 }}{{ end }}"),
    ("nested-ranges", "{{ range 10000 }}{{ range 10000 }}{{ end }}{{ end }}"),
    ("recursion", '{{ define "r" }}{{ template "r" . }}{{ end }}{{ template "r" . }}'),
    ("output", "{{ range 1000000 }}xxxxxxxxxxxxxxxxxxxx{{ end }}"),
    ("doubling", '{{ $s := "xx" }}{{ range 100 }}{{ $s = print $s $s }}{{ end }}'),
    ("width", '{{ range 1000 }}{{ printf "%999999d" 1 }}{{ end }}'),
]


@pytest.mark.parametrize("source", [c[1] for c in RUNAWAY], ids=[c[0] for c in RUNAWAY])
def test_runaway_templates_stop(source: str) -> None:
    with pytest.raises(GoTemplateError, match="exceeds|maximum template depth"):
        GoTemplate(source).execute({}, max_output=1_000_000, max_steps=200_000)


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    with pytest.raises(GoTemplateError):
        GoTemplate("{{ if 1 }}" * 500 + "{{ end }}" * 500)
    with pytest.raises(GoTemplateError, match="max expression depth"):
        GoTemplate("{{ " + "(" * 500 + "1" + ")" * 500 + " }}")


# ---- fmt and json, as Go prints them ---------------------------------------------------------

FMT = [
    ("%v", (1.0,), "1"),
    ("%v", (123456.0,), "123456"),
    ("%v", (1234567.0,), "1.234567e+06"),
    ("%v", (0.0001,), "0.0001"),
    ("%v", (0.00001,), "1e-05"),
    ("%v", (0.1 + 0.2,), "0.30000000000000004"),
    ("%f|%.1f|%e|%g|%G", (2.5, 2.25, 1234.5, 1e21, 1e-7), "2.500000|2.2|1.234500e+03|1e+21|1E-07"),
    ("%8.3f|%-8.2f|%08.3f|%+.1f", (3.14159, 2.5, -3.14159, 2.0), "   3.142|2.50    |-003.142|+2.0"),
    ("%d|%5d|%-5d|%05d|%+d|% d", (1, 2, 3, -4, 5, 6), "1|    2|3    |-0004|+5| 6"),
    (
        "%x|%X|%#x|%o|%#o|%b|%c|%U",
        (255, 255, 255, 8, 8, 5, 0x263A, 0x263A),
        "ff|FF|0xff|10|010|101|☺|U+263A",
    ),  # fmt: skip
    (
        "%s|%q|%10s|%-4s|%.2s|%x|% x",
        ("é", 'a"b\n', "r", "l", "abc", "hi", "hi"),
        'é|"a\\"b\\n"|         r|l   |ab|6869|68 69',
    ),  # fmt: skip
    ("%q|%+q|%#q", ("☺", "☺", "x`y"), '"☺"|"\\u263a"|"x`y"'),
    ("%t|%v|%s", (True, None, [1, "a"]), "true|<nil>|[%!s(int=1) a]"),
    (
        "%v|%+v",
        ({"b": [1], "a": None}, Msg("user", "hi")),
        "map[a:<nil> b:[1]]|{Role:user Content:hi hidden:}",
    ),
    ("%d %d", (1,), "1 %!d(MISSING)"),
    ("%d", (1, "x", None), "1%!(EXTRA string=x, <nil>)"),
    ("%!|%z|%", (1, 2), "%!!(int=1)|%!z(int=2)|%!(NOVERB)"),
    ("%[2]d %[1]d|%*d|%.*f", (1, 2, 3, 4, 2, 1.234), "2 1|%!(EXTRA ...)"),
    ("%T %T %T", (1, "s", [1]), "int string []interface {}"),
]


@pytest.mark.parametrize("fmt, args, expected", FMT, ids=[f[0] for f in FMT])
def test_printf(fmt: str, args: tuple[Any, ...], expected: str) -> None:
    if expected.endswith("(EXTRA ...)"):  # explicit indexes: no EXTRA complaint
        assert sprintf("%[2]d %[1]d", 1, 2) == "2 1"
        assert sprintf("%*d|%.*f", 3, 4, 2, 1.234) == "  4|1.23"
        return
    assert sprintf(fmt, *args) == expected


def test_print_spacing() -> None:
    assert sprint("a", 1, 2, "b", None, 3) == "a1 2b<nil> 3"
    assert sprintln("a", 1, None) == "a 1 <nil>\n"


def test_json_like_go() -> None:
    value = {"b": [1, 2.5, 1e21, 1e-7, 1e20, -0.0], "a": '<x> & "y"\u2028\n\x01', "c": None}
    assert marshal(value) == (
        '{"a":"\\u003cx\\u003e \\u0026 \\"y\\"\\u2028\\n\\u0001",'
        '"b":[1,2.5,1e+21,1e-7,100000000000000000000,-0],"c":null}'
    )
