package agent

import (
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/onebox-project/onebox/fabric/api"
)

func TestParseByteSize(t *testing.T) {
	tests := []struct {
		in   string
		want ByteSize
		ok   bool
	}{
		{"0", 0, true},
		{"4096", 4096, true},
		{"512MiB", 512 << 20, true},
		{"2GiB", 2 << 30, true},
		{"1.5G", 3 << 29, true},
		{"100M", 100 << 20, true},
		{"2 GiB", 2 << 30, true},
		{" 2GiB\n", 2 << 30, true},
		{"1K", 1 << 10, true},
		{"1KB", 1 << 10, true},
		{"1kib", 1 << 10, true},
		{"3T", 3 << 40, true},
		{"7B", 7, true},
		{"0.5K", 512, true},
		{"4194304TiB", 1 << 62, true}, // the largest size accepted

		{"", 0, false},
		{"-1", 0, false},
		{"-1G", 0, false},
		{"abc", 0, false},
		{"G", 0, false},
		{"1X", 0, false},
		{"1P", 0, false},
		{"1GG", 0, false},
		{"1 2G", 0, false},
		{"1e30G", 0, false},
		{"1e400", 0, false},
		{"4194305TiB", 0, false},
		{"NaN", 0, false},
		{"Inf", 0, false},
		{"1,5G", 0, false},
	}
	for _, tt := range tests {
		got, err := ParseByteSize(tt.in)
		if tt.ok {
			if err != nil || got != tt.want {
				t.Errorf("ParseByteSize(%q) = %d, %v; want %d", tt.in, got, err, tt.want)
			}
			continue
		}
		if err == nil {
			t.Errorf("ParseByteSize(%q) = %d, want an error", tt.in, got)
		} else if !strings.Contains(err.Error(), "bad size") {
			t.Errorf("ParseByteSize(%q) error %q is not the friendly one", tt.in, err)
		}
	}
}

func TestByteSizeString(t *testing.T) {
	tests := []struct {
		in   ByteSize
		want string
	}{
		{0, "0B"},
		{1023, "1023B"},
		{1 << 10, "1KiB"},
		{1536, "1.5KiB"},
		{512 << 20, "512MiB"},
		{100 << 20, "100MiB"},
		{2 << 30, "2GiB"},
		{3 << 29, "1.5GiB"},
		{1 << 40, "1TiB"},
		{1 << 50, "1024TiB"},
	}
	for _, tt := range tests {
		if got := tt.in.String(); got != tt.want {
			t.Errorf("ByteSize(%d).String() = %q, want %q", uint64(tt.in), got, tt.want)
		}
	}
}

func TestByteSizeStringRoundTrip(t *testing.T) {
	for shift := 0; shift <= 62; shift++ {
		b := ByteSize(1) << shift
		s := b.String()
		back, err := ParseByteSize(s)
		if err != nil || back != b {
			t.Errorf("2^%d: String() = %q parses to %d, %v", shift, s, back, err)
		}
	}
}

func TestByteSizeUnmarshalJSON(t *testing.T) {
	tests := []struct {
		in   string
		want ByteSize
		ok   bool
	}{
		{`0`, 0, true},
		{`4096`, 4096, true},
		{`"2GiB"`, 2 << 30, true},
		{`"100M"`, 100 << 20, true},
		{`"4096"`, 4096, true},
		{`-1`, 0, false},
		{`1.5`, 0, false},
		{`"-1"`, 0, false},
		{`"lots"`, 0, false},
		{`true`, 0, false},
		{`{}`, 0, false},
		{`null`, 0, true}, // null is accepted (as 0)
	}
	for _, tt := range tests {
		var b ByteSize
		err := json.Unmarshal([]byte(tt.in), &b)
		if tt.ok != (err == nil) || (tt.ok && b != tt.want) {
			t.Errorf("Unmarshal(%s) = %d, %v; want %d ok=%v", tt.in, b, err, tt.want, tt.ok)
		}
	}
	// In a struct, as the config file holds it.
	var c struct {
		D ByteSize `json:"donate_memory"`
	}
	if err := json.Unmarshal([]byte(`{"donate_memory":"512MiB"}`), &c); err != nil || c.D != 512<<20 {
		t.Errorf("config field = %d, %v", c.D, err)
	}
}

func TestByteSizeSet(t *testing.T) {
	b := ByteSize(7)
	if err := b.Set("1K"); err != nil || b != 1024 {
		t.Errorf("Set(1K) = %d, %v", b, err)
	}
	if err := b.Set("nope"); err == nil || b != 1024 {
		t.Errorf("Set(nope) = %d, %v; want an error and the value kept", b, err)
	}
	if b.Type() != "size" {
		t.Errorf("Type() = %q", b.Type())
	}
}

func export(name, path string) api.Export { return api.Export{Name: name, Path: path} }

// validConfig is a configuration that passes Validate.
func validConfig(t *testing.T) Config {
	t.Helper()
	return Config{NodeName: "n1", DataDir: t.TempDir()}
}

func TestValidateDefaults(t *testing.T) {
	c := validConfig(t)
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.BindAddr != "0.0.0.0" {
		t.Errorf("BindAddr = %q", c.BindAddr)
	}
	if ip := net.ParseIP(c.AdvertiseAddr); ip == nil || ip.IsUnspecified() {
		t.Errorf("AdvertiseAddr = %q, want a specific IP", c.AdvertiseAddr)
	}
	if c.GossipPort != DefaultGossipPort || c.FabricPort != DefaultFabricPort {
		t.Errorf("ports %d, %d", c.GossipPort, c.FabricPort)
	}
	if c.APISocket != filepath.Join(c.DataDir, "agent.sock") {
		t.Errorf("APISocket = %q", c.APISocket)
	}
	if c.ReconnectInterval != 5*time.Second || c.PeerTimeout != 2*time.Second {
		t.Errorf("ReconnectInterval %v, PeerTimeout %v", c.ReconnectInterval, c.PeerTimeout)
	}
	if c.Logger == nil || c.Version != "dev" {
		t.Errorf("Logger %v, Version %q", c.Logger, c.Version)
	}
	if !c.nameFromFlag {
		t.Error("a given name is not marked as given")
	}

	var empty Config
	empty.NodeName = "n1"
	if err := empty.Validate(); err != nil {
		t.Fatal(err)
	}
	if empty.DataDir != DefaultDataDir || empty.APISocket != filepath.Join(DefaultDataDir, "agent.sock") {
		t.Errorf("DataDir %q APISocket %q", empty.DataDir, empty.APISocket)
	}
}

func TestValidateKeepsGivenValues(t *testing.T) {
	c := validConfig(t)
	c.BindAddr = "127.0.0.1"
	c.GossipPort, c.FabricPort = -1, 17947
	c.APISocket = filepath.Join(c.DataDir, "x.sock")
	c.ReconnectInterval = time.Second
	c.Version = "1.2.3"
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.AdvertiseAddr != "127.0.0.1" {
		t.Errorf("AdvertiseAddr = %q, want the specific bind address", c.AdvertiseAddr)
	}
	if c.GossipPort != -1 || c.FabricPort != 17947 || c.APISocket != filepath.Join(c.DataDir, "x.sock") || c.ReconnectInterval != time.Second || c.Version != "1.2.3" {
		t.Errorf("Validate overwrote given values: %+v", c)
	}
}

func TestValidateHostName(t *testing.T) {
	h, err := os.Hostname()
	if err != nil {
		t.Skip(err)
	}
	want := strings.SplitN(h, ".", 2)[0]
	c := Config{DataDir: t.TempDir()}
	err = c.Validate()
	if c.NodeName != want {
		t.Errorf("NodeName = %q, want the host name's first label %q", c.NodeName, want)
	}
	if c.nameFromFlag {
		t.Error("a defaulted name is marked as given")
	}
	if err != nil && !strings.Contains(err.Error(), "node name") {
		t.Errorf("Validate: %v", err)
	}
}

func TestValidateRejects(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	const token = "obx1.0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.00112233445566778899aabbccddeeff"
	tests := []struct {
		name    string
		modify  func(c *Config)
		wantErr string
	}{
		{"bad node name", func(c *Config) { c.NodeName = "bad name" }, "node name"},
		{"bind address is a host name", func(c *Config) { c.BindAddr = "localhost" }, "bind address"},
		{"bind address with port", func(c *Config) { c.BindAddr = "0.0.0.0:7947" }, "bind address"},
		{"unspecified advertise address", func(c *Config) { c.AdvertiseAddr = "0.0.0.0" }, "advertise address"},
		{"advertise host name", func(c *Config) { c.AdvertiseAddr = "example.com" }, "advertise address"},
		{"gossip port -2", func(c *Config) { c.GossipPort = -2 }, "gossip port"},
		{"fabric port 65536", func(c *Config) { c.FabricPort = 65536 }, "fabric port"},
		{"bad token", func(c *Config) { c.Token = "obx1.nope" }, "token"},
		{"token with one digit too few", func(c *Config) { c.Token = token[:len(token)-1] }, "token"},
		{"export of a file", func(c *Config) { c.Exports = append(c.Exports, export("f", file)) }, "not a directory"},
		{"export of a missing path", func(c *Config) { c.Exports = append(c.Exports, export("m", filepath.Join(dir, "missing"))) }, "not a directory"},
		{"duplicate export names", func(c *Config) {
			c.Exports = append(c.Exports, export("d", dir), export("d", t.TempDir()))
		}, "given twice"},
		{"empty export name", func(c *Config) { c.Exports = append(c.Exports, export("", dir)) }, "not a valid directory name"},
		{"export name with slash", func(c *Config) { c.Exports = append(c.Exports, export("a/b", dir)) }, "not a valid directory name"},
		{"export name ..", func(c *Config) { c.Exports = append(c.Exports, export("..", dir)) }, "not a valid directory name"},
		{"empty --join", func(c *Config) { c.Join = []string{""} }, "--join"},
		{"API socket path of 108 bytes", func(c *Config) { c.APISocket = "/" + strings.Repeat("s", 107) }, "API socket"},
		{"data dir making the socket path too long", func(c *Config) { c.DataDir = "/" + strings.Repeat("d", 100) }, "API socket"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := validConfig(t)
			tt.modify(&c)
			err := c.Validate()
			if err == nil {
				t.Fatalf("Validate accepted %+v", c)
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q does not mention %q", err, tt.wantErr)
			}
		})
	}
}

func TestValidateAccepts(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name   string
		modify func(c *Config)
	}{
		{"valid token", func(c *Config) {
			c.Token = " obx1.0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef.00112233445566778899aabbccddeeff\n"
		}},
		{"exports", func(c *Config) {
			c.Exports = append(c.Exports, export("a", dir), export("b", dir))
			c.Exports[1].ReadOnly = true
		}},
		{"free ports", func(c *Config) { c.GossipPort, c.FabricPort = -1, -1 }},
		{"highest port", func(c *Config) { c.GossipPort, c.FabricPort = 65535, 65534 }},
		{"IPv6 bind", func(c *Config) { c.BindAddr = "::1" }},
		{"API socket path of 107 bytes", func(c *Config) { c.APISocket = "/" + strings.Repeat("s", 106) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := validConfig(t)
			tt.modify(&c)
			if err := c.Validate(); err != nil {
				t.Errorf("Validate: %v", err)
			}
		})
	}
}

func TestValidateReportsEveryProblem(t *testing.T) {
	c := validConfig(t)
	c.NodeName = "-x"
	c.BindAddr = "nope"
	c.Token = "nope"
	err := c.Validate()
	if err == nil {
		t.Fatal("Validate accepted three errors")
	}
	for _, want := range []string{"node name", "bind address", "token"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

func TestValidateJoinDefaultPort(t *testing.T) {
	tests := []struct{ in, want string }{
		{"host", "host:7947"},
		{"host.example.com", "host.example.com:7947"},
		{"10.0.0.1", "10.0.0.1:7947"},
		{"10.0.0.1:1234", "10.0.0.1:1234"},
		{"host:1234", "host:1234"},
		{"::1", "[::1]:7947"},
		{"fd00::1", "[fd00::1]:7947"},
		{"[fd00::1]:1234", "[fd00::1]:1234"},
	}
	c := validConfig(t)
	for _, tt := range tests {
		c.Join = append(c.Join, tt.in)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	for i, tt := range tests {
		if c.Join[i] != tt.want {
			t.Errorf("--join %q became %q, want %q", tt.in, c.Join[i], tt.want)
		}
		if _, _, err := net.SplitHostPort(c.Join[i]); err != nil {
			t.Errorf("--join %q became %q, which does not split: %v", tt.in, c.Join[i], err)
		}
	}
}

func TestValidateJoinBracketedIPv6WithoutPort(t *testing.T) {
	c := validConfig(t)
	c.Join = []string{"[fd00::1]"}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if c.Join[0] != "[fd00::1]:7947" {
		t.Errorf("--join [fd00::1] became %q, want [fd00::1]:7947", c.Join[0])
	}
}

func TestLoadConfigFile(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	c, err := LoadConfigFile(write("ok.json", `{"name":"n7","bind":"127.0.0.1","gossip_port":-1,"join":["m1"],"donate_memory":"2GiB",
		"exports":[{"name":"data","path":"/srv","read_only":true}]}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.NodeName != "n7" || c.BindAddr != "127.0.0.1" || c.GossipPort != -1 || len(c.Join) != 1 || c.DonateMemory != 2<<30 ||
		len(c.Exports) != 1 || !c.Exports[0].ReadOnly || c.Exports[0].Path != "/srv" {
		t.Errorf("LoadConfigFile = %+v", c)
	}
	if _, err := LoadConfigFile(write("typo.json", `{"nmae":"n7"}`)); err == nil || !strings.Contains(err.Error(), "nmae") {
		t.Errorf("unknown key: %v, want an error naming it", err)
	}
	if _, err := LoadConfigFile(write("size.json", `{"donate_memory":"lots"}`)); err == nil {
		t.Error("bad donate_memory accepted")
	}
	if _, err := LoadConfigFile(write("bad.json", `{`)); err == nil {
		t.Error("truncated JSON accepted")
	}
	if _, err := LoadConfigFile(filepath.Join(dir, "missing.json")); err == nil {
		t.Error("missing file accepted")
	}
}
