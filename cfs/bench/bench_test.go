package bench

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func TestRatioAndFormat(t *testing.T) {
	if got := ratio(300, 200); got != 1.5 {
		t.Errorf("ratio(300, 200) = %v, want 1.5", got)
	}
	if got := ratio(300, 0); got != 0 {
		t.Errorf("ratio(300, 0) = %v, want 0", got)
	}
	for r, want := range map[float64]string{1.5: "1.50x", 0.237: "0.24x", 0: "-", -1: "-"} {
		if got := FormatRatio(r); got != want {
			t.Errorf("FormatRatio(%v) = %q, want %q", r, got, want)
		}
	}
	for _, c := range []struct {
		v    float64
		want string
	}{{1386.4, "1386 MB/s"}, {12.34, "12.3 MB/s"}, {0, "-"}} {
		if got := formatRate(c.v, "MB/s"); got != c.want {
			t.Errorf("formatRate(%v) = %q, want %q", c.v, got, c.want)
		}
	}
	if got := mbps(256e6, 2*time.Second); got != 128 {
		t.Errorf("mbps = %v, want 128", got)
	}
	for n, want := range map[int64]string{256 << 20: "256MiB", 1 << 30: "1GiB", 4 << 10: "4KiB", 1000: "1000B"} {
		if got := sizeString(n); got != want {
			t.Errorf("sizeString(%d) = %q, want %q", n, got, want)
		}
	}
	for _, c := range []struct {
		r, target float64
		want      string
	}{{0.64, 0.5, "met"}, {0.4, 0.5, "missed"}, {0, 0.5, "not measured"}} {
		if got := verdict(c.r, c.target); got != c.want {
			t.Errorf("verdict(%v, %v) = %q, want %q", c.r, c.target, got, c.want)
		}
	}
}

func TestRatios(t *testing.T) {
	a := &Measure{WriteMBps: 300, ReadMBps: 400, CreatesPerS: 500}
	b := &Measure{WriteMBps: 100, ReadMBps: 200, CreatesPerS: 1000}
	if got, want := ratios(a, b), (Ratios{3, 2, 0.5}); got != want {
		t.Errorf("ratios = %+v, want %+v", got, want)
	}
	if got := ratios(a, &Measure{Err: "boom"}); got != (Ratios{}) {
		t.Errorf("ratios with an error = %+v, want zero", got)
	}
	if got := ratios(a, nil); got != (Ratios{}) {
		t.Errorf("ratios with nil = %+v, want zero", got)
	}
}

func TestMountinfo(t *testing.T) {
	mi := `22 1 8:1 / / rw,relatime - ext4 /dev/vda rw
97 22 0:50 / /tmp/obx-sshfs1/mnt rw,nosuid - fuse.sshfs root@127.0.0.1:/tmp/x rw
98 22 0:51 / /tmp/with\040space rw - fuse x rw
`
	for path, want := range map[string]bool{"/tmp/obx-sshfs1/mnt": true, "/tmp/with space": true, "/tmp": false, "/": true} {
		if got := mountinfoHas(strings.NewReader(mi), path); got != want {
			t.Errorf("mountinfoHas(%q) = %v, want %v", path, got, want)
		}
	}
}

func TestVersionLine(t *testing.T) {
	out := "fusermount3 version: 3.14.0\nSSHFS version 3.7.3\nFUSE library version 3.14.0\n"
	if got := versionLine(out); got != "SSHFS version 3.7.3" {
		t.Errorf("versionLine = %q", got)
	}
}

func TestPrintTable(t *testing.T) {
	r := &Result{Size: 256 << 20, Files: 2000, CPUs: 2, ScratchFS: "ext4", SSHFSVersion: "SSHFS version 3.7.3",
		Measures: []Measure{
			{Name: Local, WriteMBps: 1386, ReadMBps: 549, CreatesPerS: 13397},
			{Name: Onebox, WriteMBps: 331, ReadMBps: 351, CreatesPerS: 602},
			{Name: SSHFS, Err: "sshfs read: timed out after 1m0s"},
		}}
	r.OneboxLocal = ratios(r.Measure(Onebox), r.Measure(Local))
	s := ratios(r.Measure(Onebox), r.Measure(SSHFS))
	r.OneboxSSHFS = &s
	var b bytes.Buffer
	PrintTable(&b, r)
	out := b.String()
	for _, want := range []string{"onebox/local", "0.64x", "onebox/sshfs", "sshfs: sshfs read: timed out", "onebox >= 0.5x local: met",
		"onebox >= 1.5x sshfs: not measured", "page cache dropped", "files/s"} {
		if !strings.Contains(out, want) {
			t.Errorf("table lacks %q:\n%s", want, out)
		}
	}
	r.DropCaches = "permission denied"
	b.Reset()
	PrintTable(&b, r)
	if !strings.Contains(b.String(), "page cache NOT dropped (permission denied)") {
		t.Errorf("table does not say the page cache was not dropped:\n%s", b.String())
	}
}
