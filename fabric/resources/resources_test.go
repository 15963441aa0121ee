package resources

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

const goodMeminfo = "MemTotal:       16384256 kB\nMemFree:         1000000 kB\nMemAvailable:    8000000 kB\nBuffers:  1 kB\n"

func TestParseMeminfo(t *testing.T) {
	tests := []struct {
		name       string
		in         string
		total, av  uint64
		wantErrSub string
	}{
		{"good", goodMeminfo, 16384256 * 1024, 8000000 * 1024, ""},
		{"no MemAvailable falls back to MemFree", "MemTotal: 100 kB\nMemFree: 40 kB\n", 102400, 40960, ""},
		{"no unit", "MemTotal: 100\nMemAvailable: 50\n", 100, 50, ""},
		{"empty", "", 0, 0, "no MemTotal line"},
		{"no MemTotal", "MemAvailable: 5 kB\n", 0, 0, "no MemTotal line"},
		{"no available", "MemTotal: 5 kB\n", 0, 0, "no MemAvailable or MemFree"},
		{"truncated value", "MemTotal:", 0, 0, "malformed MemTotal"},
		{"truncated mid-file", "MemTotal: 16384256 kB\nMemAvail", 0, 0, "no MemAvailable or MemFree"},
		{"non-numeric", "MemTotal: lots kB\n", 0, 0, "bad MemTotal"},
		{"negative", "MemTotal: -5 kB\n", 0, 0, "bad MemTotal"},
		{"overflow", "MemTotal: 18446744073709551615 kB\nMemFree: 1 kB\n", 0, 0, "bad MemTotal"},
		{"bad unit", "MemTotal: 5 MB\n", 0, 0, "malformed MemTotal"},
		{"too long line", "MemTotal: 5 kB\n" + strings.Repeat("x", 70000), 0, 0, "too long"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			total, av, err := ParseMeminfo(strings.NewReader(tt.in))
			if tt.wantErrSub != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErrSub) || !strings.HasPrefix(err.Error(), "resources: ") {
					t.Fatalf("err = %v, want containing %q", err, tt.wantErrSub)
				}
				return
			}
			if err != nil || total != tt.total || av != tt.av {
				t.Fatalf("got (%d, %d, %v), want (%d, %d, nil)", total, av, err, tt.total, tt.av)
			}
		})
	}
}

func TestParseLoadavg(t *testing.T) {
	tests := []struct {
		name        string
		in          string
		l1, l5, l15 float64
		procs       int
		wantErr     bool
	}{
		{"good", "0.08 0.04 0.01 1/83 2158\n", 0.08, 0.04, 0.01, 83, false},
		{"busy", "12.50 7.25 3.00 9/1024 99999", 12.5, 7.25, 3, 1024, false},
		{"empty", "", 0, 0, 0, 0, true},
		{"truncated", "0.08 0.04 0.01", 0, 0, 0, 0, true},
		{"truncated procs", "0.08 0.04 0.01 1/", 0, 0, 0, 0, true},
		{"no slash", "0.08 0.04 0.01 83 2158", 0, 0, 0, 0, true},
		{"bad float", "x 0.04 0.01 1/83 2158", 0, 0, 0, 0, true},
		{"NaN", "NaN 0.04 0.01 1/83 2158", 0, 0, 0, 0, true},
		{"Inf", "0.1 +Inf 0.01 1/83 2158", 0, 0, 0, 0, true},
		{"negative load", "-1 0.04 0.01 1/83 2158", 0, 0, 0, 0, true},
		{"negative procs", "0.1 0.04 0.01 1/-83 2158", 0, 0, 0, 0, true},
		{"huge procs", "0.1 0.04 0.01 1/99999999999999 2158", 0, 0, 0, 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l1, l5, l15, procs, err := ParseLoadavg(tt.in)
			if tt.wantErr {
				if err == nil || !strings.HasPrefix(err.Error(), "resources: /proc/loadavg: ") {
					t.Fatalf("err = %v, want a /proc/loadavg error", err)
				}
				return
			}
			if err != nil || l1 != tt.l1 || l5 != tt.l5 || l15 != tt.l15 || procs != tt.procs {
				t.Fatalf("got (%v %v %v %d %v)", l1, l5, l15, procs, err)
			}
		})
	}
}

func TestParseBtime(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    int64
		wantErr bool
	}{
		{"good", "cpu  1 2 3\ncpu0 1 2 3\nintr 5 6\nbtime 1700000000\nprocesses 9\n", 1700000000, false},
		{"missing", "cpu 1 2 3\n", 0, true},
		{"truncated", "cpu 1 2 3\nbtime", 0, true},
		{"garbage", "btime soon\n", 0, true},
		{"extra fields", "btime 1 2\n", 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseBtime(strings.NewReader(tt.in))
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if !tt.wantErr && got.Unix() != tt.want {
				t.Fatalf("got %v, want unix %d", got, tt.want)
			}
		})
	}
}

func TestParseMounts(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want []Mount
	}{
		{"good", "/dev/vda1 / ext4 rw,relatime 0 0\nproc /proc proc rw 0 0\n",
			[]Mount{{"/dev/vda1", "/", "ext4"}, {"proc", "/proc", "proc"}}},
		{"octal escapes", `/dev/sdb1 /mnt/my\040disk\011x vfat rw 0 0` + "\n" + `/dev/sdc /a\134b ext4 rw 0 0`,
			[]Mount{{"/dev/sdb1", "/mnt/my disk\tx", "vfat"}, {"/dev/sdc", `/a\b`, "ext4"}}},
		{"bad escapes kept literally", `/dev/x /a\09 ext4 rw 0 0` + "\n" + `/dev/y /b\04 ext4`,
			[]Mount{{"/dev/x", `/a\09`, "ext4"}, {"/dev/y", `/b\04`, "ext4"}}},
		{"malformed and truncated lines skipped", "\njunk\n/dev/vda /\n/dev/vdb /data xfs rw 0 0\n/dev/vdc /x",
			[]Mount{{"/dev/vdb", "/data", "xfs"}}},
		{"empty", "", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := ParseMounts(strings.NewReader(tt.in)); !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("got %q, want %q", got, tt.want)
			}
		})
	}
}

func writeTree(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for rel, content := range files {
		p := filepath.Join(root, rel)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestProberFakeRoot(t *testing.T) {
	root := writeTree(t, map[string]string{
		"proc/meminfo":              goodMeminfo,
		"proc/loadavg":              "1.50 0.75 0.25 3/412 31337\n",
		"proc/stat":                 "cpu 1 2 3 4\nbtime 1700000000\n",
		"proc/sys/kernel/osrelease": "6.1.0-fake\n",
		"proc/mounts": "/dev/vda1 / ext4 rw 0 0\n" +
			"/dev/vda1 /var/lib/docker ext4 rw 0 0\n" + // same device, longer mountpoint: dropped
			"/dev/loop0 /snap/x squashfs ro 0 0\n" + // loop: skipped
			"tmpfs /tmp tmpfs rw 0 0\n" + // not /dev: skipped
			`/dev/sdb1 /mnt/my\040disk xfs rw 0 0` + "\n" +
			"/dev/sdc1 /missing ext4 rw 0 0\n", // statfs fails: skipped
		"mnt/my disk/.keep": "",
	})
	s, err := Prober{Root: root}.Probe()
	if err != nil {
		t.Fatal(err)
	}
	if s.MemTotalBytes != 16384256*1024 || s.MemFreeBytes != 8000000*1024 {
		t.Errorf("mem = %d/%d", s.MemFreeBytes, s.MemTotalBytes)
	}
	if s.Load1 != 1.5 || s.Load5 != 0.75 || s.Load15 != 0.25 || s.Procs != 412 {
		t.Errorf("load = %v %v %v procs %d", s.Load1, s.Load5, s.Load15, s.Procs)
	}
	if !s.BootTime.Equal(time.Unix(1700000000, 0)) {
		t.Errorf("boot time = %v", s.BootTime)
	}
	if s.Kernel != "6.1.0-fake" {
		t.Errorf("kernel = %q", s.Kernel)
	}
	if s.CPUs < 1 {
		t.Errorf("cpus = %d", s.CPUs)
	}
	var got []Mount
	for _, d := range s.Disks {
		got = append(got, Mount{d.Device, d.Mountpoint, d.FSType})
		if d.TotalBytes == 0 || d.FreeBytes > d.TotalBytes {
			t.Errorf("disk %+v: implausible sizes", d)
		}
	}
	want := []Mount{{"/dev/sdb1", "/mnt/my disk", "xfs"}, {"/dev/vda1", "/", "ext4"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("disks = %q, want %q", got, want)
	}
	for _, n := range s.NICs {
		if n.Name == "lo" || n.SpeedMbps < 0 {
			t.Errorf("unexpected NIC %+v", n)
		}
	}
}

func TestProberFakeRootErrors(t *testing.T) {
	base := map[string]string{
		"proc/meminfo": goodMeminfo,
		"proc/loadavg": "0.1 0.1 0.1 1/2 3",
		"proc/stat":    "btime 1700000000\n",
		"proc/mounts":  "",
	}
	tests := []struct{ file, content, wantSub string }{
		{"proc/meminfo", "MemFree: 1 kB\n", "no MemTotal line"},
		{"proc/loadavg", "0.1", "/proc/loadavg"},
		{"proc/stat", "cpu 1\n", "no btime line"},
		{"proc/meminfo", "", "no MemTotal line"},
		{"proc/mounts", "\x00", ""}, // garbage mounts is fine
	}
	for _, tt := range tests {
		files := map[string]string{}
		for k, v := range base {
			files[k] = v
		}
		files[tt.file] = tt.content
		_, err := Prober{Root: writeTree(t, files)}.Probe()
		if tt.wantSub == "" {
			if err != nil {
				t.Errorf("%s=%q: unexpected error %v", tt.file, tt.content, err)
			}
		} else if err == nil || !strings.Contains(err.Error(), tt.wantSub) {
			t.Errorf("%s=%q: err = %v, want %q", tt.file, tt.content, err, tt.wantSub)
		}
	}
	if _, err := (Prober{Root: t.TempDir()}).Probe(); err == nil {
		t.Error("empty root: want error")
	}
}

func TestProbeReal(t *testing.T) {
	if _, err := os.Stat("/proc/meminfo"); err != nil {
		t.Skip("no /proc")
	}
	s, err := Probe()
	if err != nil {
		t.Fatal(err)
	}
	if s.CPUs < 1 || s.MemTotalBytes == 0 || s.MemFreeBytes > s.MemTotalBytes || s.Kernel == "" {
		t.Errorf("insane snapshot: %+v", s)
	}
	if !s.BootTime.Before(time.Now()) || s.BootTime.Before(time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)) {
		t.Errorf("boot time = %v", s.BootTime)
	}
	if s.Load1 < 0 || s.Procs < 1 {
		t.Errorf("load %v procs %d", s.Load1, s.Procs)
	}
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{`"cpus"`, `"mem_total_bytes"`, `"load15"`, `"boot_time"`, `"disks"`, `"nics"`} {
		if !strings.Contains(string(b), k) {
			t.Errorf("JSON lacks %s: %s", k, b)
		}
	}
	t.Logf("%s", b)
}

func FuzzParseMeminfo(f *testing.F) {
	f.Add(goodMeminfo)
	f.Add("MemTotal: 1\nMemFree:")
	f.Add("MemTotal:: kB kB\n")
	f.Fuzz(func(t *testing.T, s string) {
		total, av, err := ParseMeminfo(strings.NewReader(s))
		if err != nil && (total != 0 || av != 0) {
			t.Fatalf("error with non-zero results: %d %d %v", total, av, err)
		}
	})
}

func FuzzParseLoadavg(f *testing.F) {
	f.Add("0.08 0.04 0.01 1/83 2158\n")
	f.Add("1 2 3 /")
	f.Add("NaN Inf -0 0/0")
	f.Fuzz(func(t *testing.T, s string) {
		l1, l5, l15, procs, err := ParseLoadavg(s)
		if err == nil && (l1 < 0 || l5 < 0 || l15 < 0 || procs < 0) {
			t.Fatalf("accepted negative values from %q", s)
		}
	})
}
