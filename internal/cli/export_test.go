package cli

import (
	"testing"

	"github.com/onebox-project/onebox/fabric/api"
)

func TestParseExport(t *testing.T) {
	tests := []struct {
		in      string
		want    api.Export
		wantErr bool
	}{
		{"data=/srv/data", api.Export{Name: "data", Path: "/srv/data"}, false},
		{"docs=/srv/docs:ro", api.Export{Name: "docs", Path: "/srv/docs", ReadOnly: true}, false},
		{"home=/home:root-squash", api.Export{Name: "home", Path: "/home", RootSquash: true}, false},
		{"home=/home:ro,root-squash", api.Export{Name: "home", Path: "/home", ReadOnly: true, RootSquash: true}, false},
		{"home=/home:rw,root-squash", api.Export{Name: "home", Path: "/home", RootSquash: true}, false},
		{"odd=/srv/a:b", api.Export{Name: "odd", Path: "/srv/a:b"}, false}, // not options: part of the path
		{"odd=/srv/a:b:ro", api.Export{Name: "odd", Path: "/srv/a:b", ReadOnly: true}, false},
		{"noname", api.Export{}, true},
		{"=/srv", api.Export{}, true},
		{"x=", api.Export{}, true},
		{"x=:ro", api.Export{}, true},
	}
	for _, tc := range tests {
		got, err := parseExport(tc.in)
		if (err != nil) != tc.wantErr {
			t.Errorf("parseExport(%q): error %v, want error %v", tc.in, err, tc.wantErr)
			continue
		}
		if !tc.wantErr && got != tc.want {
			t.Errorf("parseExport(%q) = %+v, want %+v", tc.in, got, tc.want)
		}
	}
}
