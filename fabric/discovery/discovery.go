// Package discovery finds onebox agents of the same cluster on the local network by mDNS, so a node started with only a join token joins by itself.
//
// Every agent announces itself as a DNS-SD service instance of type
// [ServiceName] in the "local." domain, named after its node. The instance's
// TXT record carries four key=value entries: node (node name), cluster (short
// cluster id, lowercase hex), fabric (host:port of the mTLS fabric port, where
// joins and control calls go) and gossip (host:port of the gossip port).
// [Browse] multicasts a PTR query for the service, collects the TXT records of
// every answer, decodes them with the strict [ParseTXT] and keeps the peers of
// the requested cluster.
//
// Security: discovery only yields candidate addresses. Anyone on the LAN can
// answer mDNS queries, so an announcement proves nothing. Authenticity comes
// later, from the join protocol, which pins the cluster CA named by the join
// token: a spoofed or stale announcement can only cause a failed join
// attempt, never a join to the wrong cluster. Announcements also carry nothing
// secret (no token, no key): the node name, cluster id and addresses are
// visible to the LAN.
//
// Announcing uses github.com/hashicorp/mdns's responder. Browsing uses its own
// small one-shot querier (built on github.com/miekg/dns) instead of
// mdns.Query, whose result entries are shared with its receive loop (a data
// race when an instance answers twice), merges instances of the same name
// from different clusters, drops results the reader is not ready for, sends a
// single query without retry and ignores context cancellation.
package discovery

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/mdns"
	"github.com/miekg/dns"
	"golang.org/x/net/ipv4"

	"github.com/onebox-project/onebox/internal/stdlog"
)

// ServiceName is the DNS-SD service type onebox agents announce.
const ServiceName = "_onebox._tcp"

// DefaultTimeout is how long [Browse] listens for answers when
// BrowseConfig.Timeout is zero.
const DefaultTimeout = 2 * time.Second

const (
	domain      = "local."
	serviceFQDN = ServiceName + "." + domain // "_onebox._tcp.local."

	keyNode    = "node"
	keyCluster = "cluster"
	keyFabric  = "fabric"
	keyGossip  = "gossip"

	maxNodeLen    = 63
	maxClusterLen = 64
	maxTXTEntry   = 255 // a DNS character-string holds at most 255 bytes
	maxHostLen    = 253

	// maxPeers bounds what one Browse keeps, so a flood of spoofed answers
	// cannot grow memory without limit.
	maxPeers = 1024
)

// ErrBadTXT is wrapped by every error [ParseTXT] returns.
var ErrBadTXT = errors.New("discovery: invalid TXT record")

// Peer is one announced agent.
type Peer struct {
	Node       string // node name
	ClusterID  string // short cluster id (hex)
	FabricAddr string // host:port of the agent's mTLS fabric port (join + control)
	GossipAddr string // host:port of the gossip port
}

// TXT returns the TXT record entries announcing p, in a fixed order. It does
// not validate p; [ParseTXT] of the result succeeds exactly when p is valid.
func (p Peer) TXT() []string {
	return []string{
		keyNode + "=" + p.Node,
		keyCluster + "=" + p.ClusterID,
		keyFabric + "=" + p.FabricAddr,
		keyGossip + "=" + p.GossipAddr,
	}
}

// ParseTXT decodes the TXT record of an announcement. Its input comes from the
// network, so it is strict: exactly the keys node, cluster, fabric and gossip,
// each once, lowercase, as key=value; node is 1-63 characters of letters,
// digits, '-', '_' and '.' starting with a letter or digit; cluster is 1-64
// hex digits (returned lowercase); fabric and gossip are host:port with a
// port in 1-65535 and a host that is an IP address (not unspecified, not
// multicast, no IPv6 zone) or a DNS host name. Errors wrap [ErrBadTXT].
func ParseTXT(txt []string) (Peer, error) {
	var p Peer
	var seen [4]bool
	for i, e := range txt {
		if len(e) > maxTXTEntry {
			return Peer{}, fmt.Errorf("%w: entry %d is %d bytes, more than %d", ErrBadTXT, i, len(e), maxTXTEntry)
		}
		k, v, ok := strings.Cut(e, "=")
		if !ok {
			return Peer{}, fmt.Errorf("%w: entry %d %s is not key=value", ErrBadTXT, i, clip(e))
		}
		var idx int
		var dst *string
		var check func(string) (string, error)
		switch k {
		case keyNode:
			idx, dst, check = 0, &p.Node, checkNode
		case keyCluster:
			idx, dst, check = 1, &p.ClusterID, checkCluster
		case keyFabric:
			idx, dst, check = 2, &p.FabricAddr, checkHostPort
		case keyGossip:
			idx, dst, check = 3, &p.GossipAddr, checkHostPort
		default:
			return Peer{}, fmt.Errorf("%w: entry %d: unknown key %s (want node, cluster, fabric, gossip)", ErrBadTXT, i, clip(k))
		}
		if seen[idx] {
			return Peer{}, fmt.Errorf("%w: entry %d: duplicate key %q", ErrBadTXT, i, k)
		}
		seen[idx] = true
		val, err := check(v)
		if err != nil {
			return Peer{}, fmt.Errorf("%w: %s: %v", ErrBadTXT, k, err)
		}
		*dst = val
	}
	var missing []string
	for i, k := range []string{keyNode, keyCluster, keyFabric, keyGossip} {
		if !seen[i] {
			missing = append(missing, k)
		}
	}
	if len(missing) > 0 {
		return Peer{}, fmt.Errorf("%w: missing key(s) %s", ErrBadTXT, strings.Join(missing, ", "))
	}
	return p, nil
}

// checkNode validates a node name with the same rule as the pki package.
func checkNode(s string) (string, error) {
	if len(s) == 0 || len(s) > maxNodeLen {
		return "", fmt.Errorf("node name %s must be 1-%d characters", clip(s), maxNodeLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		alnum := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
		if !alnum && (i == 0 || c != '-' && c != '_' && c != '.') {
			return "", fmt.Errorf("node name %s: only letters, digits, '-', '_' and '.' are allowed, starting with a letter or digit", clip(s))
		}
	}
	return s, nil
}

// checkCluster validates a short cluster id and returns it lowercase.
func checkCluster(s string) (string, error) {
	if len(s) == 0 || len(s) > maxClusterLen {
		return "", fmt.Errorf("cluster id %s must be 1-%d hex digits", clip(s), maxClusterLen)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
			return "", fmt.Errorf("cluster id %s: not hex", clip(s))
		}
	}
	return strings.ToLower(s), nil
}

// checkHostPort validates an announced host:port and returns it unchanged.
func checkHostPort(s string) (string, error) {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		why := err
		var ae *net.AddrError
		if errors.As(err, &ae) {
			why = errors.New(ae.Err)
		}
		return "", fmt.Errorf("address %s: not host:port: %v", clip(s), why)
	}
	if net.JoinHostPort(host, port) != s {
		// e.g. "[1.2.3.4]:80" or "[name]:80": accepted by SplitHostPort, but not canonical.
		return "", fmt.Errorf("address %s: brackets are only for IPv6 addresses", clip(s))
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 || strconv.FormatUint(n, 10) != port {
		return "", fmt.Errorf("address %s: port must be a decimal number in 1-65535", clip(s))
	}
	if host == "" {
		return "", fmt.Errorf("address %s: missing host", clip(s))
	}
	if a, err := netip.ParseAddr(host); err == nil {
		switch {
		case a.Zone() != "":
			return "", fmt.Errorf("address %s: IPv6 zones are local to the announcing host", clip(s))
		case a.Unmap().IsUnspecified():
			return "", fmt.Errorf("address %s: unspecified IP (announce the address peers should dial)", clip(s))
		case a.IsMulticast():
			return "", fmt.Errorf("address %s: multicast IP", clip(s))
		}
		return s, nil
	}
	if strings.Contains(host, ":") {
		return "", fmt.Errorf("address %s: bad IPv6 address", clip(s))
	}
	if err := checkHostname(host); err != nil {
		return "", fmt.Errorf("address %s: %v", clip(s), err)
	}
	return s, nil
}

// checkHostname accepts DNS host names: dot-separated labels of 1-63
// letters, digits and '-', not starting or ending with '-', with an optional
// final dot.
func checkHostname(h string) error {
	h = strings.TrimSuffix(h, ".")
	if len(h) == 0 || len(h) > maxHostLen {
		return fmt.Errorf("host name must be 1-%d characters", maxHostLen)
	}
	last := h[strings.LastIndexByte(h, '.')+1:]
	if strings.Trim(last, "0123456789") == "" {
		return errors.New("host name must not end in a numeric label (a malformed IP address?)")
	}
	for label := range strings.SplitSeq(h, ".") {
		if len(label) == 0 || len(label) > 63 {
			return errors.New("host name labels must be 1-63 characters")
		}
		if label[0] == '-' || label[len(label)-1] == '-' {
			return errors.New("host name labels must not start or end with '-'")
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
				return errors.New("host name: only letters, digits, '-' and '.' are allowed")
			}
		}
	}
	return nil
}

// clip quotes s for an error message, cut to a bounded length: the text may
// be anything a stranger on the network sent.
func clip(s string) string {
	const max = 64
	if len(s) > max {
		return strconv.Quote(s[:max]) + "..."
	}
	return strconv.Quote(s)
}

// AnnounceConfig configures [Announce].
type AnnounceConfig struct {
	Peer      Peer
	Interface *net.Interface // nil: all multicast interfaces
	Logger    *slog.Logger   // nil: slog.Default()
}

// Announcer answers mDNS queries for one agent until closed.
type Announcer struct {
	servers []*mdns.Server
	once    sync.Once
}

// Announce starts answering mDNS queries for [ServiceName] with cfg.Peer's
// announcement. The peer is validated as [ParseTXT] would on the receiving
// side. Several announcers, in one process or several, may run on one host;
// each must have its own node name, which is its instance name.
//
// With a nil Interface it listens on every interface that is up and has the
// MULTICAST flag (falling back to the system's default multicast interface
// if there is none); it fails only if it could listen nowhere. IPv6
// listeners are used where they can be opened and silently skipped where not.
func Announce(cfg AnnounceConfig) (*Announcer, error) {
	logger := cfg.Logger
	if logger == nil {
		logger = slog.Default()
	}
	peer, err := ParseTXT(cfg.Peer.TXT())
	if err != nil {
		return nil, fmt.Errorf("discovery: announce: %w", err)
	}

	var ifaces []*net.Interface
	if cfg.Interface != nil {
		ifaces = []*net.Interface{cfg.Interface}
	} else {
		ifaces = multicastInterfaces()
	}
	ips, err := announceIPs(peer, ifaces)
	if err != nil {
		return nil, err
	}
	// The instance name is the node name; a '.' in it is escaped so the name
	// stays one DNS label, as DNS-SD wants.
	instance := strings.ReplaceAll(peer.Node, ".", `\.`)
	svc, err := mdns.NewMDNSService(instance, ServiceName, domain, hostName(peer), fabricPort(peer), ips, peer.TXT())
	if err != nil {
		return nil, fmt.Errorf("discovery: announce: %w", err)
	}

	mlog := mdnsLogger(logger)
	a := &Announcer{}
	var errs []error
	if len(ifaces) == 0 {
		ifaces = []*net.Interface{nil} // the system's default multicast interface
	}
	for _, ifi := range ifaces {
		s, err := mdns.NewServer(&mdns.Config{Zone: svc, Iface: ifi, Logger: mlog})
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", ifaceName(ifi), err))
			logger.Debug("discovery: cannot listen for mDNS", "interface", ifaceName(ifi), "err", err)
			continue
		}
		a.servers = append(a.servers, s)
	}
	if len(a.servers) == 0 {
		return nil, fmt.Errorf("discovery: announce: no mDNS listener could be started: %w", errors.Join(errs...))
	}
	logger.Debug("discovery: announcing", "node", peer.Node, "cluster", peer.ClusterID,
		"fabric", peer.FabricAddr, "gossip", peer.GossipAddr, "listeners", len(a.servers))
	return a, nil
}

// Close stops answering. It is safe to call more than once.
func (a *Announcer) Close() error {
	a.once.Do(func() {
		for _, s := range a.servers {
			s.Shutdown()
		}
	})
	return nil
}

// hostName is the SRV target of the announcement. It is synthetic and under
// "onebox.local." so the A records served for it can never clash with the
// machine's own mDNS host name (which avahi or Bonjour may defend).
func hostName(p Peer) string {
	label := strings.ReplaceAll(p.Node, ".", "-")
	c := p.ClusterID
	if len(c) > 16 {
		c = c[:16]
	}
	return label + "." + c + ".onebox." + domain
}

func fabricPort(p Peer) int {
	_, port, _ := net.SplitHostPort(p.FabricAddr)
	n, _ := strconv.Atoi(port)
	return n
}

// announceIPs returns the addresses of the A/AAAA records: the IPs of the
// fabric and gossip addresses, or, if both use host names, the addresses of
// the announcing interfaces. Browse does not use them (the TXT record is
// authoritative); they make the announcement complete for generic DNS-SD
// browsers.
func announceIPs(p Peer, ifaces []*net.Interface) ([]net.IP, error) {
	var ips []net.IP
	add := func(ip net.IP) {
		if !slices.ContainsFunc(ips, ip.Equal) {
			ips = append(ips, ip)
		}
	}
	for _, hp := range []string{p.FabricAddr, p.GossipAddr} {
		host, _, _ := net.SplitHostPort(hp)
		if ip := net.ParseIP(host); ip != nil {
			add(ip)
		}
	}
	if len(ips) > 0 {
		return ips, nil
	}
	for _, ifi := range ifaces {
		addrs, err := ifi.Addrs()
		if err != nil {
			continue
		}
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok && n.IP.IsGlobalUnicast() {
				add(n.IP)
			}
		}
	}
	if len(ips) == 0 {
		return nil, fmt.Errorf("discovery: announce: no IP address for the A record: %s and %s use host names and no multicast interface has a global unicast address", p.FabricAddr, p.GossipAddr)
	}
	return ips, nil
}

// multicastInterfaces lists the interfaces that are up and multicast-capable.
func multicastInterfaces() []*net.Interface {
	all, err := net.Interfaces()
	if err != nil {
		return nil
	}
	var out []*net.Interface
	for i := range all {
		if all[i].Flags&net.FlagUp != 0 && all[i].Flags&net.FlagMulticast != 0 {
			out = append(out, &all[i])
		}
	}
	return out
}

func ifaceName(ifi *net.Interface) string {
	if ifi == nil {
		return "default"
	}
	return ifi.Name
}

// mdnsLogger routes hashicorp/mdns's std-log output to logger at debug
// level: the library logs every malformed packet it sees, which strangers on
// the LAN control.
func mdnsLogger(logger *slog.Logger) *log.Logger {
	// The library's errors (an IPv6 listener that cannot open, a bad
	// packet from the LAN) are routine here: debug at most.
	return stdlog.New(logger, stdlog.Options{Max: stdlog.Debug, Prefix: "discovery: mdns library: "})
}

// BrowseConfig configures [Browse].
type BrowseConfig struct {
	ClusterID string         // keep only peers of this cluster; "" keeps every cluster
	Timeout   time.Duration  // how long to listen for answers; 0: DefaultTimeout
	Interface *net.Interface // nil: all multicast interfaces with an IPv4 address
	Logger    *slog.Logger   // nil: slog.Default(); rejected answers are logged at debug level
}

// Browse multicasts mDNS queries for [ServiceName] over IPv4 and returns the
// peers of cfg.ClusterID that answered within cfg.Timeout: deduplicated
// (identical announcements collapse), sorted by Node (then addresses), and
// an empty slice with a nil error if none answered. Answers whose TXT record
// fails [ParseTXT] are ignored. The query is repeated a few times within the
// timeout (at 0, 250ms, 1s, 2.5s, 5.5s, ...) so one lost packet does not hide a peer.
//
// If ctx ends before the timeout, Browse returns the peers found so far and
// ctx's error. An error is also returned if the query could not be sent at
// all (for example, no multicast route).
func Browse(ctx context.Context, cfg BrowseConfig) ([]Peer, error) {
	logger := cfg.Logger
	if logger == nil {
		logger = slog.Default()
	}
	cluster := ""
	if cfg.ClusterID != "" {
		c, err := checkCluster(cfg.ClusterID)
		if err != nil {
			return nil, fmt.Errorf("discovery: browse: %v", err)
		}
		cluster = c
	}
	timeout := cfg.Timeout
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}

	// A one-shot querier (RFC 6762 section 5.1): query from an ephemeral
	// port, and responders answer by unicast to it.
	conn, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4zero})
	if err != nil {
		return nil, fmt.Errorf("discovery: browse: %w", err)
	}
	defer conn.Close()
	pc := ipv4.NewPacketConn(conn)
	_ = pc.SetMulticastTTL(255)       // RFC 6762 section 11
	_ = pc.SetMulticastLoopback(true) // find agents on this very host too

	var ifaces []*net.Interface
	if cfg.Interface != nil {
		ifaces = []*net.Interface{cfg.Interface}
	} else {
		for _, ifi := range multicastInterfaces() {
			if hasIPv4(ifi) {
				ifaces = append(ifaces, ifi)
			}
		}
		if len(ifaces) == 0 {
			ifaces = []*net.Interface{nil} // let the routing table choose
		}
	}

	q := new(dns.Msg)
	q.SetQuestion(serviceFQDN, dns.TypePTR)
	q.Id = 0 // RFC 6762 section 18.1
	q.RecursionDesired = false
	query, err := q.Pack()
	if err != nil {
		return nil, fmt.Errorf("discovery: browse: %w", err)
	}
	group := &net.UDPAddr{IP: net.IPv4(224, 0, 0, 251), Port: 5353}
	send := func() error {
		var errs []error
		sent := false
		for _, ifi := range ifaces {
			if ifi != nil {
				if err := pc.SetMulticastInterface(ifi); err != nil {
					errs = append(errs, fmt.Errorf("%s: %w", ifi.Name, err))
					continue
				}
			}
			if _, err := conn.WriteToUDP(query, group); err != nil {
				errs = append(errs, fmt.Errorf("%s: %w", ifaceName(ifi), err))
				continue
			}
			sent = true
		}
		if !sent {
			return errors.Join(errs...)
		}
		for _, err := range errs {
			logger.Debug("discovery: mDNS query not sent", "err", err)
		}
		return nil
	}

	start := time.Now()
	deadline := start.Add(timeout)
	// Wake the blocked read when ctx ends.
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()

	if err := send(); err != nil {
		return nil, fmt.Errorf("discovery: browse: sending mDNS query: %w", err)
	}
	resend := start.Add(250 * time.Millisecond)
	gap := 750 * time.Millisecond

	found := make(map[Peer]struct{})
	buf := make([]byte, 65536)
	for {
		now := time.Now()
		if !now.Before(deadline) {
			break
		}
		if !now.Before(resend) {
			if err := send(); err != nil {
				logger.Debug("discovery: resending mDNS query", "err", err)
			}
			resend = now.Add(gap)
			gap *= 2
		}
		if ctx.Err() != nil {
			break
		}
		wake := resend
		if deadline.Before(wake) {
			wake = deadline
		}
		conn.SetReadDeadline(wake)
		if ctx.Err() != nil { // ctx ended before this deadline replaced the AfterFunc's
			break
		}
		n, src, err := conn.ReadFromUDP(buf)
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return sortedPeers(found), fmt.Errorf("discovery: browse: %w", err)
		}
		collect(buf[:n], src, cluster, found, logger)
	}
	peers := sortedPeers(found)
	if err := ctx.Err(); err != nil {
		return peers, err
	}
	return peers, nil
}

// collect decodes one mDNS response and adds the peers of cluster ("" for
// any) announced in it to found.
func collect(pkt []byte, src *net.UDPAddr, cluster string, found map[Peer]struct{}, logger *slog.Logger) {
	var m dns.Msg
	if err := m.Unpack(pkt); err != nil {
		logger.Debug("discovery: undecodable mDNS packet", "from", src, "err", err)
		return
	}
	if !m.Response || m.Opcode != dns.OpcodeQuery || m.Rcode != dns.RcodeSuccess {
		return
	}
	for _, rrs := range [][]dns.RR{m.Answer, m.Extra} {
		for _, rr := range rrs {
			txt, ok := rr.(*dns.TXT)
			if !ok || !isInstanceOfService(txt.Hdr.Name) {
				continue
			}
			p, err := ParseTXT(txt.Txt)
			if err != nil {
				logger.Debug("discovery: ignoring announcement", "from", src, "name", clip(txt.Hdr.Name), "err", err)
				continue
			}
			if cluster != "" && p.ClusterID != cluster {
				continue
			}
			if _, dup := found[p]; !dup && len(found) >= maxPeers {
				logger.Debug("discovery: too many peers, ignoring the rest", "max", maxPeers)
				return
			}
			found[p] = struct{}{}
		}
	}
}

// isInstanceOfService reports whether name is "<instance>._onebox._tcp.local."
// (DNS names compare case-insensitively).
func isInstanceOfService(name string) bool {
	suffix := "." + serviceFQDN
	return len(name) > len(suffix) && strings.EqualFold(name[len(name)-len(suffix):], suffix)
}

func sortedPeers(found map[Peer]struct{}) []Peer {
	peers := make([]Peer, 0, len(found))
	for p := range found {
		peers = append(peers, p)
	}
	slices.SortFunc(peers, func(a, b Peer) int {
		return cmp.Or(
			strings.Compare(a.Node, b.Node),
			strings.Compare(a.ClusterID, b.ClusterID),
			strings.Compare(a.FabricAddr, b.FabricAddr),
			strings.Compare(a.GossipAddr, b.GossipAddr))
	})
	return peers
}

func hasIPv4(ifi *net.Interface) bool {
	addrs, err := ifi.Addrs()
	if err != nil {
		return false
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok && n.IP.To4() != nil {
			return true
		}
	}
	return false
}
