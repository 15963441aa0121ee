package shim

import (
	"os"
	"os/exec"
	"testing"

	"github.com/onebox-project/onebox/internal/testenv"
)

func TestBuild(t *testing.T) {
	_, err := exec.LookPath("cc")
	testenv.NeedNoError(t, err, "no C compiler (cc)")
	dir := t.TempDir()
	a, err := Build(dir)
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(a)
	if err != nil || st.Size() == 0 {
		t.Fatalf("stat %s: %v", a, err)
	}
	b, err := Build(dir) // cached
	if err != nil || b != a {
		t.Fatalf("second Build = %s, %v; want %s", b, err, a)
	}
	if len(Source()) == 0 {
		t.Fatal("no embedded source")
	}
}
