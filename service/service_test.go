package service

import (
	"path/filepath"
	"reflect"
	"testing"
)

func TestParseTarget(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Target
		ok   bool
	}{
		{"n2:8000", Target{Node: "n2", Port: 8000}, true},
		{" web-1:1 ", Target{Node: "web-1", Port: 1}, true},
		{"g0123456789ab:80", Target{GID: "g0123456789ab", Port: 80}, true},
		{"g0123456789AB:80", Target{Node: "g0123456789AB", Port: 80}, true}, // ids are lower-case hex: a node name
		{"n2", Target{}, false},
		{"n2:", Target{}, false},
		{":8000", Target{}, false},
		{"n2:0", Target{}, false},
		{"n2:65536", Target{}, false},
		{"n2:http", Target{}, false},
		{"10.0.0.1:80:1", Target{}, false},
		{"a/b:80", Target{}, false},
	} {
		got, err := ParseTarget(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseTarget(%q) = %+v, %v; want %+v ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
		if err == nil {
			if back, _ := ParseTarget(got.String()); back != got {
				t.Errorf("%q: String %q does not parse back", tc.in, got.String())
			}
		}
	}
}

func TestValidName(t *testing.T) {
	for name, ok := range map[string]bool{"web": true, "n1-8080": true, "a.b_c": true, "": false, "-x": false, ".x": false, "a b": false, "a/b": false, "ü": false} {
		if err := ValidName(name); (err == nil) != ok {
			t.Errorf("ValidName(%q) = %v, want ok=%v", name, err, ok)
		}
	}
}

func TestStore(t *testing.T) {
	path := filepath.Join(t.TempDir(), "services.json")
	if specs, err := Load(path); err != nil || specs != nil {
		t.Fatalf("missing file: %v %v", specs, err)
	}
	want := []Spec{{Name: "web", Node: "n1", Port: 8080, Policy: "least-conn",
		Targets: []Target{{Node: "n2", Port: 8000}, {GID: "g0123456789ab", Port: 9000}}}}
	if err := Save(path, want); err != nil {
		t.Fatal(err)
	}
	got, err := Load(path)
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("Load = %+v, %v", got, err)
	}
	if err := Save(path, []Spec{{Name: "bad name", Node: "n1", Port: 1}}); err != nil {
		t.Fatal(err)
	}
	if _, err := Load(path); err == nil {
		t.Fatal("an invalid spec loaded")
	}
}
