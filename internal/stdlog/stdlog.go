// Package stdlog adapts libraries that log through the standard library's
// *log.Logger (serf, memberlist, mdns, net/http) to log/slog, keeping the
// "[LEVEL]" prefixes HashiCorp's libraries put on each line as slog levels.
package stdlog

import (
	"context"
	"log"
	"log/slog"
	"strings"
)

// prefixes are the level markers HashiCorp libraries start lines with.
var prefixes = []struct {
	p string
	l slog.Level
}{
	{"[TRACE]", slog.LevelDebug - 4},
	{"[DEBUG]", slog.LevelDebug},
	{"[INFO]", slog.LevelInfo},
	{"[WARN]", slog.LevelWarn},
	{"[ERR]", slog.LevelError},
	{"[ERROR]", slog.LevelError},
}

// Options shape how lines are logged.
type Options struct {
	// Max caps the level: a library's own errors that are routine for us
	// (an mdns listener failing on IPv6, a client sending garbage to an
	// HTTP server) are logged at most at Max. Zero means no cap.
	Max *slog.Level
	// Demote, if set, lowers lines it matches to debug level.
	Demote func(msg string) bool
	// Prefix is put before every message.
	Prefix string
}

// New returns a *log.Logger whose lines go to l.
func New(l *slog.Logger, o Options) *log.Logger {
	return log.New(writer{l, o}, "", 0)
}

type writer struct {
	l *slog.Logger
	o Options
}

func (w writer) Write(p []byte) (int, error) {
	msg, lvl := Parse(string(p))
	if w.o.Demote != nil && w.o.Demote(msg) {
		lvl = min(lvl, slog.LevelDebug)
	}
	if w.o.Max != nil {
		lvl = min(lvl, *w.o.Max)
	}
	w.l.Log(context.Background(), lvl, w.o.Prefix+msg)
	return len(p), nil
}

// Parse splits a line into its message and level (info without a prefix).
func Parse(line string) (string, slog.Level) {
	s := strings.TrimSpace(line)
	for _, x := range prefixes {
		if rest, ok := strings.CutPrefix(s, x.p); ok {
			return strings.TrimSpace(rest), x.l
		}
	}
	return s, slog.LevelInfo
}

// Debug is a ready cap for Options.Max.
var Debug = func() *slog.Level { l := slog.LevelDebug; return &l }()
