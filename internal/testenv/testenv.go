// Package testenv decides what a test does when the machine lacks something
// it needs (root, FUSE, CRIU, network namespaces, userfaultfd): skip, with
// the reason, on a developer's machine; fail in CI (CI=true), which has all
// of them, so a broken install can never pass as a skipped test.
package testenv

import (
	"fmt"
	"os"
	"testing"
)

// Need skips (or, in CI, fails) t unless ok.
func Need(t testing.TB, ok bool, format string, args ...any) {
	t.Helper()
	if ok {
		return
	}
	reason := fmt.Sprintf(format, args...)
	if os.Getenv("CI") == "true" {
		t.Fatalf("CI must be able to run this test, but: %s", reason)
	}
	t.Skip(reason)
}

// NeedNoError is Need(t, err == nil, ...) with err in the reason.
func NeedNoError(t testing.TB, err error, what string) {
	t.Helper()
	if err != nil {
		Need(t, false, "%s: %v", what, err)
	}
}
