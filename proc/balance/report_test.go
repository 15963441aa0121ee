package balance

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func goodReport() Report {
	s := time.Unix(1700000000, 0).UTC()
	return Report{Node: "n1", CPUs: 2, Load: 2.5, Balancing: true, Migrating: "g0123456789ab",
		Procs:   []ProcReport{{GID: "g0123456789ab", Demand: 1, RSSBytes: 1 << 20, Balance: true, StaysUntil: &s}},
		Recent:  []MoveRecord{{GID: "g0123456789ab", From: "n1", To: "n2", Reason: "balance: x", At: s, Seconds: 0.4, Error: "e"}},
		Sampled: s}
}

func TestDecodeReport(t *testing.T) {
	b, _ := json.Marshal(goodReport())
	r, err := DecodeReport(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("good report: %v", err)
	}
	if r.Node != "n1" || r.CPUs != 2 || len(r.Procs) != 1 || r.Procs[0].StaysUntil == nil {
		t.Fatalf("decoded %+v", r)
	}
	// A newer member's extra fields are ignored, its values still checked.
	if r, err := DecodeReport(strings.NewReader(`{"node":"n1","cpus":1,"load":0,"later":{"x":[1]}}`)); err != nil || r.Node != "n1" {
		t.Fatalf("report with an unknown field: %+v, %v", r, err)
	}
	bad := map[string]string{
		"not JSON":                 "{",
		"unknown field, bad value": `{"node":"n1","cpus":0,"load":0,"later":1}`,
		"bad node":                 `{"node":"../x","cpus":1,"load":0}`,
		"no CPUs":                  `{"node":"n1","cpus":0,"load":0}`,
		"too many CPUs":            `{"node":"n1","cpus":99999999,"load":0}`,
		"negative load":            `{"node":"n1","cpus":1,"load":-1}`,
		"huge load":                `{"node":"n1","cpus":1,"load":1e300}`,
		"bad migrating":            `{"node":"n1","cpus":1,"load":0,"migrating":"x"}`,
		"bad proc id":              `{"node":"n1","cpus":1,"load":0,"procs":[{"gid":"nope","demand":1}]}`,
		"negative demand":          `{"node":"n1","cpus":1,"load":0,"procs":[{"gid":"g0123456789ab","demand":-1}]}`,
		"long reason":              `{"node":"n1","cpus":1,"load":0,"recent":[{"gid":"g0123456789ab","reason":"` + strings.Repeat("x", 5000) + `"}]}`,
	}
	for name, in := range bad {
		if _, err := DecodeReport(strings.NewReader(in)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func FuzzDecodeReport(f *testing.F) {
	b, _ := json.Marshal(goodReport())
	f.Add(b)
	f.Add([]byte(`{"node":"n1","cpus":1,"load":0}`))
	f.Add([]byte(`{"node":"n1","cpus":1,"load":1e400}`))
	f.Add([]byte(`{"node":"n1","cpus":1,"load":0,"procs":[{"gid":"g0123456789ab","demand":"NaN"}]}`))
	f.Fuzz(func(t *testing.T, in []byte) {
		r, err := DecodeReport(bytes.NewReader(in))
		if err != nil {
			return
		}
		if err := r.Check(); err != nil {
			t.Fatalf("decoded a report that does not check: %v", err)
		}
		if r.CPUs < 1 || !finite(r.Load) || r.Load < 0 {
			t.Fatalf("accepted %+v", r)
		}
		// What was accepted survives a round trip.
		b, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := DecodeReport(bytes.NewReader(b)); err != nil {
			t.Fatalf("re-decoding an accepted report: %v", err)
		}
	})
}

func TestParseStat(t *testing.T) {
	tests := []struct {
		in      string
		want    Stat
		wantErr bool
	}{
		{"1234 (sh) R 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 100 1000 200 18446744073709551615", Stat{'R', 1234, 1}, false},
		{"99 (a b) c) S 1 50 50 0 -1 0 0 0 0 0 0 0 0 0 20 0 4 0 1 1 1", Stat{'S', 50, 4}, false},
		{"99 ((x)) D 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 12 0 1 1 1", Stat{'D', 7, 12}, false},
		{"", Stat{}, true},
		{"99 (x R 1 7", Stat{}, true},
		{"99 (x) R 1 7 7", Stat{}, true},
		{"99 (x) R 1 -7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 1 1 1", Stat{}, true},
		{"99 (x) RR 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 1 1 1", Stat{}, true},
		{"99 (x) R 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 many 0 1 1 1", Stat{}, true},
	}
	for _, tt := range tests {
		got, err := ParseStat(tt.in)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("ParseStat(%q) = %+v, %v; want %+v, error %v", tt.in, got, err, tt.want, tt.wantErr)
		}
	}
}

func FuzzParseStat(f *testing.F) {
	f.Add("1234 (sh) R 1 1234 1234 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 1 0 100 1000 200")
	f.Add("99 (a b) c) S 1 50 50 0 -1 0 0 0 0 0 0 0 0 0 20 0 4 0 1 1 1")
	f.Fuzz(func(t *testing.T, s string) {
		st, err := ParseStat(s)
		if err == nil && (st.PGID < 0 || st.Threads < 0) {
			t.Fatalf("accepted %+v", st)
		}
	})
}
