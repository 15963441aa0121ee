package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/onebox-project/onebox/fabric/api"
	"github.com/onebox-project/onebox/fabric/pki"
)

// Default ports. Gossip uses TCP and UDP on its port; the fabric port is
// TCP with TLS 1.3.
const (
	DefaultGossipPort = 7946
	DefaultFabricPort = 7947
	DefaultDataDir    = "/var/lib/onebox"
)

// Config configures an agent. The zero value of every field means "the
// default", which Validate fills in. It can be read from a JSON file whose
// keys are the json tags below; command-line flags override the file.
type Config struct {
	NodeName      string       `json:"name"`      // default: the host name
	DataDir       string       `json:"data_dir"`  // default: /var/lib/onebox
	BindAddr      string       `json:"bind"`      // default: 0.0.0.0
	AdvertiseAddr string       `json:"advertise"` // default: the bind address, or the first non-loopback IPv4
	GossipPort    int          `json:"gossip_port"`
	FabricPort    int          `json:"fabric_port"`
	APISocket     string       `json:"api_socket"`   // default: DATA_DIR/agent.sock
	MetricsAddr   string       `json:"metrics_addr"` // plain-HTTP /metrics for Prometheus; empty: off (metrics stay on the API socket)
	Join          []string     `json:"join"`         // fabric addresses (host[:port]) of members
	Token         string       `json:"token"`        // join token; needed only on first start of a new node
	NoDiscover    bool         `json:"no_discover"`  // disable LAN auto-discovery (mDNS)
	DonateMemory  ByteSize     `json:"donate_memory"`
	Exports       []api.Export `json:"exports"`
	Mount         string       `json:"mount"` // where to mount the cluster filesystem (PATH/<node>/<export>/...); empty or "none": not mounted (the CLI's default is DefaultMount)
	// MountOptional: Mount is the default, not asked for; if it cannot be
	// mounted (not root, no /dev/fuse, in use) the agent runs on with a warning.
	MountOptional bool `json:"-"`
	// ReconnectInterval is how often failed members are retried, so a
	// healed partition merges back. Default 5s.
	// (Flags only, like PeerTimeout: JSON has no duration type.)
	ReconnectInterval time.Duration `json:"-"`
	// PeerTimeout bounds each request to another member. Default 2s.
	PeerTimeout time.Duration `json:"-"`

	// Capability settings, each defined beside its capability
	// (service.go, mem.go, balance.go); their JSON keys are top-level.
	ServiceConfig
	MemoryConfig
	BalanceConfig

	Logger  *slog.Logger `json:"-"`
	Version string       `json:"-"`

	nameFromFlag bool // NodeName was given, not defaulted from the host name
}

// LoadConfigFile reads a JSON config file. Unknown keys are an error, so a
// typo does not silently leave a default in place.
func LoadConfigFile(path string) (Config, error) {
	var c Config
	f, err := os.Open(path)
	if err != nil {
		return c, fmt.Errorf("config: %w", err)
	}
	defer f.Close()
	dec := json.NewDecoder(f)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&c); err != nil {
		return c, fmt.Errorf("config %s: %w", path, err)
	}
	return c, nil
}

// Validate fills in defaults and checks the configuration.
func (c *Config) Validate() error {
	var errs []error
	c.nameFromFlag = c.NodeName != ""
	if c.NodeName == "" {
		h, err := os.Hostname()
		if err != nil {
			errs = append(errs, fmt.Errorf("no --name given and the host name is unknown: %w", err))
		}
		c.NodeName = strings.SplitN(h, ".", 2)[0]
	}
	if err := pki.ValidNodeName(c.NodeName); err != nil {
		errs = append(errs, err)
	}
	if c.DataDir == "" {
		c.DataDir = DefaultDataDir
	}
	if c.BindAddr == "" {
		c.BindAddr = "0.0.0.0"
	}
	if net.ParseIP(c.BindAddr) == nil {
		errs = append(errs, fmt.Errorf("bind address %q is not an IP address", c.BindAddr))
	}
	if c.AdvertiseAddr == "" {
		c.AdvertiseAddr = defaultAdvertise(c.BindAddr)
	}
	if ip := net.ParseIP(c.AdvertiseAddr); ip == nil || ip.IsUnspecified() {
		errs = append(errs, fmt.Errorf("advertise address %q must be a specific IP address", c.AdvertiseAddr))
	}
	if c.GossipPort == 0 {
		c.GossipPort = DefaultGossipPort
	}
	if c.FabricPort == 0 {
		c.FabricPort = DefaultFabricPort
	}
	// -1 asks for a free port (tests and 'onebox dev').
	for name, p := range map[string]int{"gossip": c.GossipPort, "fabric": c.FabricPort} {
		if p < -1 || p > 65535 {
			errs = append(errs, fmt.Errorf("%s port %d out of range", name, p))
		}
	}
	if c.APISocket == "" {
		c.APISocket = filepath.Join(c.DataDir, "agent.sock")
	}
	if len(c.APISocket) > 107 {
		errs = append(errs, fmt.Errorf("API socket path %q is longer than a unix socket allows (107 bytes): use a shorter --data-dir or --api-socket", c.APISocket))
	}
	for i, j := range c.Join {
		a, err := withDefaultPort(j, DefaultFabricPort)
		if err != nil {
			errs = append(errs, fmt.Errorf("--join %q: %w", j, err))
		}
		c.Join[i] = a
	}
	if c.Token != "" {
		if _, err := pki.ParseToken(c.Token); err != nil {
			errs = append(errs, err)
		}
	}
	seen := map[string]bool{}
	for _, e := range c.Exports {
		if e.Name == "" || strings.ContainsAny(e.Name, "/\x00") || e.Name == "." || e.Name == ".." {
			errs = append(errs, fmt.Errorf("export name %q is not a valid directory name", e.Name))
		}
		if seen[e.Name] {
			errs = append(errs, fmt.Errorf("export %q given twice", e.Name))
		}
		seen[e.Name] = true
		if st, err := os.Stat(e.Path); err != nil || !st.IsDir() {
			errs = append(errs, fmt.Errorf("export %s=%s: not a directory", e.Name, e.Path))
		}
	}
	if c.Mount == "none" {
		c.Mount = ""
	}
	if c.Mount != "" && !filepath.IsAbs(c.Mount) {
		errs = append(errs, fmt.Errorf("mount point %q must be an absolute path", c.Mount))
	}
	if c.ReconnectInterval == 0 {
		c.ReconnectInterval = 5 * time.Second
	}
	if c.PeerTimeout == 0 {
		c.PeerTimeout = 2 * time.Second
	}
	for _, err := range []error{c.ServiceConfig.validate(), c.MemoryConfig.validate(), c.BalanceConfig.validate()} {
		if err != nil {
			errs = append(errs, err)
		}
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Version == "" {
		c.Version = "dev"
	}
	return errors.Join(errs...)
}

func withDefaultPort(addr string, port int) (string, error) {
	if host, p, err := net.SplitHostPort(addr); err == nil {
		if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
			return "", fmt.Errorf("bad port %q", p)
		}
		if host == "" {
			return "", errors.New("empty host")
		}
		return addr, nil
	}
	if strings.HasPrefix(addr, "[") && strings.HasSuffix(addr, "]") {
		return net.JoinHostPort(addr[1:len(addr)-1], strconv.Itoa(port)), nil
	}
	if strings.Count(addr, ":") > 1 && !strings.HasPrefix(addr, "[") {
		return net.JoinHostPort(addr, strconv.Itoa(port)), nil // bare IPv6
	}
	if addr == "" {
		return "", errors.New("empty address")
	}
	return net.JoinHostPort(addr, strconv.Itoa(port)), nil
}

// defaultAdvertise picks the address other nodes should use: the bind
// address if it is specific, else the first IPv4 address of an interface
// that is up and not loopback, else loopback (a one-machine cluster).
func defaultAdvertise(bind string) string {
	if ip := net.ParseIP(bind); ip != nil && !ip.IsUnspecified() {
		return bind
	}
	ifs, _ := net.Interfaces()
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagUp == 0 || ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, _ := ifc.Addrs()
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() != nil && !ipn.IP.IsLinkLocalUnicast() {
				return ipn.IP.String()
			}
		}
	}
	return "127.0.0.1"
}

// ByteSize is a size in bytes that reads and prints as 512MiB, 2GiB, 1.5G...
type ByteSize uint64

// ParseByteSize parses sizes like "0", "4096", "512MiB", "2GiB", "1.5G",
// "100M" (K, M, G, T are binary multiples, with or without "iB"/"B").
func ParseByteSize(s string) (ByteSize, error) {
	t := strings.TrimSpace(s)
	num := strings.TrimRightFunc(t, func(r rune) bool { return r >= 'A' && r <= 'z' })
	unit := strings.ToUpper(strings.TrimSpace(t[len(num):]))
	unit = strings.TrimSuffix(strings.TrimSuffix(unit, "B"), "I")
	mult := map[string]float64{"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit]
	f, err := strconv.ParseFloat(strings.TrimSpace(num), 64)
	if mult == 0 || err != nil || f < 0 || f*mult > 1<<62 {
		return 0, fmt.Errorf("bad size %q (use e.g. 512MiB, 2GiB)", s)
	}
	return ByteSize(f * mult), nil
}

func (b ByteSize) String() string {
	v := float64(b)
	for _, u := range []string{"B", "KiB", "MiB", "GiB", "TiB"} {
		if v < 1024 || u == "TiB" {
			if u == "B" {
				return fmt.Sprintf("%d%s", uint64(b), u)
			}
			return strings.TrimSuffix(strings.TrimSuffix(fmt.Sprintf("%.1f", v), "0"), ".") + u
		}
		v /= 1024
	}
	return ""
}

// Set implements pflag.Value.
func (b *ByteSize) Set(s string) error {
	v, err := ParseByteSize(s)
	if err != nil {
		return err
	}
	*b = v
	return nil
}

// Type implements pflag.Value.
func (b *ByteSize) Type() string { return "size" }

// UnmarshalJSON accepts a number of bytes or a string like "2GiB".
func (b *ByteSize) UnmarshalJSON(data []byte) error {
	var n uint64
	if err := json.Unmarshal(data, &n); err == nil {
		*b = ByteSize(n)
		return nil
	}
	var s string
	if err := json.Unmarshal(data, &s); err != nil {
		return fmt.Errorf("size must be a number of bytes or a string like \"2GiB\"")
	}
	return b.Set(s)
}
