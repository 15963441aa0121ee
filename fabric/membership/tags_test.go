package membership_test

import (
	"net"
	"strconv"
	"strings"
	"testing"

	"github.com/onebox-project/onebox/fabric/membership"
)

func TestParseTags(t *testing.T) {
	const cid = "0123456789abcdef"
	tests := []struct {
		name string
		in   map[string]string
		want membership.Tags
	}{
		{"nil", nil, membership.Tags{}},
		{"all good", map[string]string{"fabric": "10.0.0.1:7947", "cid": cid, "v": "0.1.0-dev+abc"},
			membership.Tags{FabricAddr: "10.0.0.1:7947", ClusterID: cid, Version: "0.1.0-dev+abc"}},
		{"IPv6 fabric", map[string]string{"fabric": "[fd00::1]:7947"}, membership.Tags{FabricAddr: "[fd00::1]:7947"}},
		{"port 1", map[string]string{"fabric": "10.0.0.1:1"}, membership.Tags{FabricAddr: "10.0.0.1:1"}},
		{"port 65535", map[string]string{"fabric": "10.0.0.1:65535"}, membership.Tags{FabricAddr: "10.0.0.1:65535"}},
		{"unknown tags ignored", map[string]string{"x": "y", "cid": cid}, membership.Tags{ClusterID: cid}},
		{"full fingerprint as cluster id", map[string]string{"cid": strings.Repeat("ab", 32)}, membership.Tags{ClusterID: strings.Repeat("ab", 32)}},

		{"host name fabric dropped", map[string]string{"fabric": "evil.example.com:7947", "cid": cid}, membership.Tags{ClusterID: cid}},
		{"localhost dropped", map[string]string{"fabric": "localhost:7947"}, membership.Tags{}},
		{"fabric without port dropped", map[string]string{"fabric": "10.0.0.1"}, membership.Tags{}},
		{"port 0 dropped", map[string]string{"fabric": "10.0.0.1:0"}, membership.Tags{}},
		{"port 65536 dropped", map[string]string{"fabric": "10.0.0.1:65536"}, membership.Tags{}},
		{"port 70000 dropped", map[string]string{"fabric": "10.0.0.1:70000"}, membership.Tags{}},
		{"negative port dropped", map[string]string{"fabric": "10.0.0.1:-1"}, membership.Tags{}},
		{"named port dropped", map[string]string{"fabric": "10.0.0.1:http"}, membership.Tags{}},
		{"unbracketed IPv6 dropped", map[string]string{"fabric": "fd00::1:7947"}, membership.Tags{}},
		{"IPv6 zone dropped", map[string]string{"fabric": "[fe80::1%eth0]:7947"}, membership.Tags{}},
		{"URL dropped", map[string]string{"fabric": "https://10.0.0.1:7947"}, membership.Tags{}},

		{"upper-case cluster id dropped", map[string]string{"cid": "0123456789ABCDEF"}, membership.Tags{}},
		{"non-hex cluster id dropped", map[string]string{"cid": "xyz", "v": "1"}, membership.Tags{Version: "1"}},
		{"cluster id with space dropped", map[string]string{"cid": "0123 4567"}, membership.Tags{}},
		{"cluster id over 64 dropped", map[string]string{"cid": strings.Repeat("a", 65)}, membership.Tags{}},

		{"version with newline dropped", map[string]string{"v": "1.0\n[ERR] fake log line"}, membership.Tags{}},
		{"version with escape dropped", map[string]string{"v": "\x1b[31mred"}, membership.Tags{}},
		{"version with space dropped", map[string]string{"v": "1 0"}, membership.Tags{}},
		{"version with NUL dropped", map[string]string{"v": "1\x00"}, membership.Tags{}},
		{"non-ASCII version dropped", map[string]string{"v": "1.0é"}, membership.Tags{}},
		{"version over 64 dropped", map[string]string{"v": strings.Repeat("1", 65)}, membership.Tags{}},
		{"version of 64 kept", map[string]string{"v": strings.Repeat("1", 64)}, membership.Tags{Version: strings.Repeat("1", 64)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := membership.ParseTags(tt.in); got != tt.want {
				t.Errorf("ParseTags(%q) = %+v, want %+v", tt.in, got, tt.want)
			}
		})
	}
}

func FuzzParseTags(f *testing.F) {
	f.Add("10.0.0.1:7947", "0123456789abcdef", "0.1.0")
	f.Add("[::1]:1", "", "")
	f.Add("host:7947", "XYZ", "a b")
	f.Add("10.0.0.1:70000", strings.Repeat("a", 65), "\x00")
	f.Fuzz(func(t *testing.T, fabric, cid, version string) {
		in := map[string]string{membership.TagFabric: fabric, membership.TagCluster: cid, membership.TagVersion: version}
		got := membership.ParseTags(in)
		if got.FabricAddr != "" {
			if got.FabricAddr != fabric {
				t.Fatalf("FabricAddr %q is not the gossiped %q", got.FabricAddr, fabric)
			}
			host, port, err := net.SplitHostPort(got.FabricAddr)
			if err != nil || net.ParseIP(host) == nil {
				t.Fatalf("accepted fabric address %q that is not IP:port", fabric)
			}
			if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
				t.Fatalf("accepted fabric port %q", port)
			}
		}
		if got.ClusterID != "" && got.ClusterID != cid {
			t.Fatalf("ClusterID %q is not the gossiped %q", got.ClusterID, cid)
		}
		if len(got.ClusterID) > 64 || strings.Trim(got.ClusterID, "0123456789abcdef") != "" {
			t.Fatalf("accepted cluster id %q", got.ClusterID)
		}
		if got.Version != "" && got.Version != version {
			t.Fatalf("Version %q is not the gossiped %q", got.Version, version)
		}
		if len(got.Version) > 64 {
			t.Fatalf("accepted a %d-byte version", len(got.Version))
		}
		for _, r := range got.Version {
			if r < 0x21 || r > 0x7e {
				t.Fatalf("accepted version %q with character %q", got.Version, r)
			}
		}
		// Parsing is idempotent: what was kept is kept again.
		again := membership.ParseTags(map[string]string{
			membership.TagFabric: got.FabricAddr, membership.TagCluster: got.ClusterID, membership.TagVersion: got.Version,
		})
		if again != got {
			t.Fatalf("ParseTags is not idempotent: %+v then %+v", got, again)
		}
	})
}
