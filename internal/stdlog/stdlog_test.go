package stdlog

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in, msg string
		lvl     slog.Level
	}{
		{"[ERR] memberlist: boom\n", "memberlist: boom", slog.LevelError},
		{"[ERROR] x", "x", slog.LevelError},
		{"[WARN]  serf: slow", "serf: slow", slog.LevelWarn},
		{"[DEBUG] d", "d", slog.LevelDebug},
		{"[TRACE] t", "t", slog.LevelDebug - 4},
		{"plain line\n", "plain line", slog.LevelInfo},
		{"[ERRX] not a prefix", "[ERRX] not a prefix", slog.LevelInfo},
	} {
		msg, lvl := Parse(tc.in)
		if msg != tc.msg || lvl != tc.lvl {
			t.Errorf("Parse(%q) = %q, %v; want %q, %v", tc.in, msg, lvl, tc.msg, tc.lvl)
		}
	}
}

func TestNewCapsAndDemotes(t *testing.T) {
	var buf bytes.Buffer
	l := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug - 4}))
	New(l, Options{Max: Debug, Prefix: "lib: "}).Print("[ERR] listen udp6: no route")
	New(l, Options{Demote: func(m string) bool { return strings.Contains(m, "EventMember") }}).Print("[INFO] serf: EventMemberJoin: n2")
	New(l, Options{}).Print("[WARN] kept")
	out := buf.String()
	for _, want := range []string{`level=DEBUG msg="lib: listen udp6: no route"`, `level=DEBUG msg="serf: EventMemberJoin: n2"`, `level=WARN msg=kept`} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
}
