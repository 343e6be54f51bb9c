//! DHCP (RFC 2131/2132) messages, as the agent's server needs them: parsing
//! a client's request defensively (the guest is untrusted: every length
//! is checked, nothing can make it panic) and building the offer, ack or
//! nak. Addresses are not leased from a pool: the agent assigned each NIC
//! its address when the VM was created, so the server only answers the
//! MACs it knows with the address already theirs.

use std::net::Ipv4Addr;

use crate::ipv4::Cidr;

/// The fixed BOOTP header, before the magic cookie.
const HEADER_LEN: usize = 236;
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
const HTYPE_ETHERNET: u8 = 1;

const OPT_PAD: u8 = 0;
const OPT_SUBNET_MASK: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_DNS: u8 = 6;
const OPT_INTERFACE_MTU: u8 = 26;
const OPT_BROADCAST: u8 = 28;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_LEASE_TIME: u8 = 51;
const OPT_MESSAGE_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_RENEWAL_TIME: u8 = 58;
const OPT_REBINDING_TIME: u8 = 59;
const OPT_END: u8 = 255;

/// A DHCP message type (option 53).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Discover,
    Offer,
    Request,
    Decline,
    Ack,
    Nak,
    Release,
    Inform,
}

impl MessageType {
    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::Discover,
            2 => Self::Offer,
            3 => Self::Request,
            4 => Self::Decline,
            5 => Self::Ack,
            6 => Self::Nak,
            7 => Self::Release,
            8 => Self::Inform,
            _ => return None,
        })
    }

    fn code(self) -> u8 {
        match self {
            Self::Discover => 1,
            Self::Offer => 2,
            Self::Request => 3,
            Self::Decline => 4,
            Self::Ack => 5,
            Self::Nak => 6,
            Self::Release => 7,
            Self::Inform => 8,
        }
    }
}

/// Why a datagram is not a request the server can answer.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DhcpError {
    #[error("{0} bytes is shorter than a DHCP message")]
    TooShort(usize),
    #[error("op {0} is not a BOOTREQUEST")]
    NotRequest(u8),
    #[error("hardware type {htype} / length {hlen} is not Ethernet")]
    NotEthernet { htype: u8, hlen: u8 },
    #[error("no DHCP magic cookie (a plain BOOTP request)")]
    NoMagicCookie,
    #[error("option {code} runs past the end of the message")]
    TruncatedOption { code: u8 },
    #[error("no valid DHCP message type option")]
    NoMessageType,
}

/// A client's request, reduced to what the server looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: MessageType,
    pub xid: u32,
    pub flags: u16,
    pub ciaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub chaddr: [u8; 6],
    /// Option 50.
    pub requested_ip: Option<Ipv4Addr>,
    /// Option 54: the server the client chose.
    pub server_id: Option<Ipv4Addr>,
}

fn ipv4_at(bytes: &[u8], at: usize) -> Ipv4Addr {
    let mut octets = [0u8; 4];
    if let Some(source) = bytes.get(at..at + 4) {
        octets.copy_from_slice(source);
    }
    Ipv4Addr::from(octets)
}

fn ipv4_option(data: &[u8]) -> Option<Ipv4Addr> {
    <[u8; 4]>::try_from(data).ok().map(Ipv4Addr::from)
}

impl Request {
    /// Parses a datagram from a client.
    pub fn parse(bytes: &[u8]) -> Result<Self, DhcpError> {
        if bytes.len() < HEADER_LEN + MAGIC_COOKIE.len() {
            return Err(DhcpError::TooShort(bytes.len()));
        }
        if bytes[0] != BOOTREQUEST {
            return Err(DhcpError::NotRequest(bytes[0]));
        }
        if bytes[1] != HTYPE_ETHERNET || bytes[2] != 6 {
            return Err(DhcpError::NotEthernet {
                htype: bytes[1],
                hlen: bytes[2],
            });
        }
        if bytes[HEADER_LEN..HEADER_LEN + 4] != MAGIC_COOKIE {
            return Err(DhcpError::NoMagicCookie);
        }
        let mut chaddr = [0u8; 6];
        chaddr.copy_from_slice(&bytes[28..34]);
        let mut request = Request {
            kind: MessageType::Discover,
            xid: u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
            flags: u16::from_be_bytes([bytes[10], bytes[11]]),
            ciaddr: ipv4_at(bytes, 12),
            giaddr: ipv4_at(bytes, 24),
            chaddr,
            requested_ip: None,
            server_id: None,
        };
        let mut kind = None;
        for (code, data) in Options::new(&bytes[HEADER_LEN + 4..]) {
            let data = data.map_err(|_| DhcpError::TruncatedOption { code })?;
            match code {
                OPT_MESSAGE_TYPE => {
                    kind = data.first().copied().and_then(MessageType::from_code);
                }
                OPT_REQUESTED_IP => request.requested_ip = ipv4_option(data),
                OPT_SERVER_ID => request.server_id = ipv4_option(data),
                _ => {}
            }
        }
        request.kind = kind.ok_or(DhcpError::NoMessageType)?;
        Ok(request)
    }

    /// The client's MAC as text, like the agent stores it.
    pub fn mac(&self) -> String {
        self.chaddr
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// The options area: (code, data) pairs up to END; a truncated option
/// yields an error once and ends the walk.
struct Options<'a> {
    bytes: &'a [u8],
    done: bool,
}

impl<'a> Options<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, done: false }
    }
}

impl<'a> Iterator for Options<'a> {
    type Item = (u8, Result<&'a [u8], ()>);

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if self.done {
                return None;
            }
            let (&code, rest) = self.bytes.split_first()?;
            match code {
                OPT_PAD => self.bytes = rest,
                OPT_END => {
                    self.done = true;
                    return None;
                }
                _ => {
                    let Some((&len, rest)) = rest.split_first() else {
                        self.done = true;
                        return Some((code, Err(())));
                    };
                    let len = usize::from(len);
                    if rest.len() < len {
                        self.done = true;
                        return Some((code, Err(())));
                    }
                    let (data, rest) = rest.split_at(len);
                    self.bytes = rest;
                    return Some((code, Ok(data)));
                }
            }
        }
    }
}

/// What the server hands a NIC: its address and the network's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Ipv4Addr,
    pub dns: Vec<Ipv4Addr>,
    pub mtu: Option<u16>,
    pub lease_secs: u32,
}

impl Lease {
    fn network(&self) -> Cidr {
        Cidr::of(self.address, self.prefix)
    }
}

/// What the server does with a request from a NIC whose lease is `lease`
/// (None: a MAC the agent does not know), as server `server_id` (the
/// gateway address on the bridge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Reply(MessageType),
    /// No answer: not ours to answer, or nothing to say.
    Ignore(&'static str),
}

pub fn decide(request: &Request, lease: Option<&Lease>, server_id: Ipv4Addr) -> Answer {
    let Some(lease) = lease else {
        return Answer::Ignore("unknown MAC");
    };
    match request.kind {
        MessageType::Discover => Answer::Reply(MessageType::Offer),
        MessageType::Request => {
            if request.server_id.is_some_and(|chosen| chosen != server_id) {
                return Answer::Ignore("the client chose another server");
            }
            // SELECTING and INIT-REBOOT name the address in option 50;
            // RENEWING and REBINDING in ciaddr.
            let wanted = request.requested_ip.unwrap_or(request.ciaddr);
            if wanted == lease.address {
                Answer::Reply(MessageType::Ack)
            } else {
                Answer::Reply(MessageType::Nak)
            }
        }
        MessageType::Inform => Answer::Reply(MessageType::Ack),
        MessageType::Decline => Answer::Ignore("the client declined its address"),
        MessageType::Release => Answer::Ignore("the client released its address"),
        MessageType::Offer | MessageType::Ack | MessageType::Nak => {
            Answer::Ignore("a server's message from a client")
        }
    }
}

/// Builds the reply of type `kind` to `request`.
pub fn build_reply(
    request: &Request,
    kind: MessageType,
    lease: &Lease,
    server_id: Ipv4Addr,
) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    out[0] = BOOTREPLY;
    out[1] = HTYPE_ETHERNET;
    out[2] = 6;
    out[4..8].copy_from_slice(&request.xid.to_be_bytes());
    out[10..12].copy_from_slice(&request.flags.to_be_bytes());
    let yiaddr = match kind {
        MessageType::Offer => lease.address,
        MessageType::Ack if request.kind != MessageType::Inform => lease.address,
        _ => Ipv4Addr::UNSPECIFIED,
    };
    if request.kind == MessageType::Inform {
        out[12..16].copy_from_slice(&request.ciaddr.octets());
    }
    out[16..20].copy_from_slice(&yiaddr.octets());
    out[24..28].copy_from_slice(&request.giaddr.octets());
    out[28..34].copy_from_slice(&request.chaddr);
    out.extend_from_slice(&MAGIC_COOKIE);
    let mut option = |code: u8, data: &[u8]| {
        out.push(code);
        out.push(data.len() as u8);
        out.extend_from_slice(data);
    };
    option(OPT_MESSAGE_TYPE, &[kind.code()]);
    option(OPT_SERVER_ID, &server_id.octets());
    if kind != MessageType::Nak {
        if request.kind != MessageType::Inform {
            option(OPT_LEASE_TIME, &lease.lease_secs.to_be_bytes());
            option(OPT_RENEWAL_TIME, &(lease.lease_secs / 2).to_be_bytes());
            option(
                OPT_REBINDING_TIME,
                &(lease.lease_secs / 8 * 7).to_be_bytes(),
            );
        }
        option(OPT_SUBNET_MASK, &lease.network().netmask().octets());
        option(OPT_BROADCAST, &lease.network().broadcast_address().octets());
        option(OPT_ROUTER, &lease.gateway.octets());
        if !lease.dns.is_empty() {
            // At most 63 servers fit one option; a network has a few.
            let servers: Vec<u8> = lease
                .dns
                .iter()
                .take(63)
                .flat_map(|server| server.octets())
                .collect();
            option(OPT_DNS, &servers);
        }
        if let Some(mtu) = lease.mtu {
            option(OPT_INTERFACE_MTU, &mtu.to_be_bytes());
        }
    }
    out.push(OPT_END);
    // BOOTP relays and old clients expect at least 300 bytes.
    if out.len() < 300 {
        out.resize(300, OPT_PAD);
    }
    out
}

/// Where the reply goes: unicast to a configured client (RENEWING or
/// INFORM), else broadcast (the client has no address yet).
pub fn reply_destination(request: &Request) -> Ipv4Addr {
    if !request.ciaddr.is_unspecified() && request.giaddr.is_unspecified() {
        request.ciaddr
    } else {
        Ipv4Addr::BROADCAST
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x02, 0x4e, 0x42, 0x01, 0x02, 0x03];
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 30, 0, 1);

    fn client_message(kind: u8, options: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; HEADER_LEN];
        bytes[0] = BOOTREQUEST;
        bytes[1] = HTYPE_ETHERNET;
        bytes[2] = 6;
        bytes[4..8].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
        bytes[10] = 0x80; // the broadcast flag
        bytes[28..34].copy_from_slice(&MAC);
        bytes.extend_from_slice(&MAGIC_COOKIE);
        bytes.extend_from_slice(&[OPT_MESSAGE_TYPE, 1, kind]);
        bytes.extend_from_slice(options);
        bytes.push(OPT_END);
        bytes
    }

    fn lease() -> Lease {
        Lease {
            address: Ipv4Addr::new(10, 30, 0, 2),
            prefix: 24,
            gateway: SERVER,
            dns: vec![Ipv4Addr::new(192, 0, 2, 53)],
            mtu: Some(1450),
            lease_secs: 86_400,
        }
    }

    /// The options of a reply, by code.
    fn reply_options(reply: &[u8]) -> std::collections::HashMap<u8, Vec<u8>> {
        assert_eq!(reply[HEADER_LEN..HEADER_LEN + 4], MAGIC_COOKIE);
        Options::new(&reply[HEADER_LEN + 4..])
            .map(|(code, data)| (code, data.unwrap().to_vec()))
            .collect()
    }

    #[test]
    fn a_discover_is_parsed() {
        let request = Request::parse(&client_message(1, &[0, 0, 55, 2, 1, 3])).unwrap();
        assert_eq!(request.kind, MessageType::Discover);
        assert_eq!(request.xid, 0xdead_beef);
        assert_eq!(request.flags, 0x8000);
        assert_eq!(request.mac(), "02:4e:42:01:02:03");
        assert_eq!(request.requested_ip, None);
    }

    #[test]
    fn an_offer_carries_the_address_and_the_network_settings() {
        let request = Request::parse(&client_message(1, &[])).unwrap();
        assert_eq!(
            decide(&request, Some(&lease()), SERVER),
            Answer::Reply(MessageType::Offer)
        );
        let reply = build_reply(&request, MessageType::Offer, &lease(), SERVER);
        assert_eq!(reply[0], BOOTREPLY);
        assert_eq!(reply[4..8], 0xdead_beef_u32.to_be_bytes());
        assert_eq!(reply[16..20], [10, 30, 0, 2], "yiaddr");
        assert_eq!(reply[28..34], MAC);
        assert!(reply.len() >= 300);
        let options = reply_options(&reply);
        assert_eq!(options[&OPT_MESSAGE_TYPE], [2]);
        assert_eq!(options[&OPT_SERVER_ID], [10, 30, 0, 1]);
        assert_eq!(options[&OPT_SUBNET_MASK], [255, 255, 255, 0]);
        assert_eq!(options[&OPT_BROADCAST], [10, 30, 0, 255]);
        assert_eq!(options[&OPT_ROUTER], [10, 30, 0, 1]);
        assert_eq!(options[&OPT_DNS], [192, 0, 2, 53]);
        assert_eq!(options[&OPT_INTERFACE_MTU], 1450u16.to_be_bytes());
        assert_eq!(options[&OPT_LEASE_TIME], 86_400u32.to_be_bytes());
        assert_eq!(reply_destination(&request), Ipv4Addr::BROADCAST);
    }

    #[test]
    fn a_request_for_the_assigned_address_is_acked_and_others_are_naked() {
        let ours = client_message(3, &[50, 4, 10, 30, 0, 2, 54, 4, 10, 30, 0, 1]);
        let request = Request::parse(&ours).unwrap();
        assert_eq!(request.requested_ip, Some(Ipv4Addr::new(10, 30, 0, 2)));
        assert_eq!(
            decide(&request, Some(&lease()), SERVER),
            Answer::Reply(MessageType::Ack)
        );
        let other = Request::parse(&client_message(3, &[50, 4, 10, 30, 0, 9])).unwrap();
        assert_eq!(
            decide(&other, Some(&lease()), SERVER),
            Answer::Reply(MessageType::Nak)
        );
        let nak = build_reply(&other, MessageType::Nak, &lease(), SERVER);
        assert_eq!(nak[16..20], [0, 0, 0, 0], "a NAK offers no address");
        let options = reply_options(&nak);
        assert_eq!(options[&OPT_MESSAGE_TYPE], [6]);
        assert!(!options.contains_key(&OPT_ROUTER));
        // The client chose another server's offer: not ours to answer.
        let elsewhere = Request::parse(&client_message(
            3,
            &[50, 4, 10, 30, 0, 2, 54, 4, 10, 30, 0, 7],
        ))
        .unwrap();
        assert!(matches!(
            decide(&elsewhere, Some(&lease()), SERVER),
            Answer::Ignore(_)
        ));
    }

    #[test]
    fn a_renewal_is_acked_by_unicast() {
        let mut bytes = client_message(3, &[]);
        bytes[12..16].copy_from_slice(&[10, 30, 0, 2]);
        let request = Request::parse(&bytes).unwrap();
        assert_eq!(
            decide(&request, Some(&lease()), SERVER),
            Answer::Reply(MessageType::Ack)
        );
        assert_eq!(reply_destination(&request), Ipv4Addr::new(10, 30, 0, 2));
    }

    #[test]
    fn unknown_macs_and_client_side_messages_get_no_answer() {
        let request = Request::parse(&client_message(1, &[])).unwrap();
        assert_eq!(
            decide(&request, None, SERVER),
            Answer::Ignore("unknown MAC")
        );
        for kind in [2, 4, 5, 6, 7] {
            let request = Request::parse(&client_message(kind, &[])).unwrap();
            assert!(matches!(
                decide(&request, Some(&lease()), SERVER),
                Answer::Ignore(_)
            ));
        }
        let inform = Request::parse(&client_message(8, &[])).unwrap();
        let reply = build_reply(&inform, MessageType::Ack, &lease(), SERVER);
        assert_eq!(reply[16..20], [0, 0, 0, 0], "an INFORM's ACK has no yiaddr");
        assert!(!reply_options(&reply).contains_key(&OPT_LEASE_TIME));
    }

    #[test]
    fn malformed_datagrams_are_refused_with_the_reason() {
        assert_eq!(Request::parse(&[1; 10]), Err(DhcpError::TooShort(10)));
        let mut reply = client_message(1, &[]);
        reply[0] = BOOTREPLY;
        assert_eq!(Request::parse(&reply), Err(DhcpError::NotRequest(2)));
        let mut token_ring = client_message(1, &[]);
        token_ring[1] = 6;
        assert!(matches!(
            Request::parse(&token_ring),
            Err(DhcpError::NotEthernet { htype: 6, .. })
        ));
        let mut bootp = client_message(1, &[]);
        bootp[HEADER_LEN] = 0;
        assert_eq!(Request::parse(&bootp), Err(DhcpError::NoMagicCookie));
        // An option whose length runs past the end.
        let mut truncated = client_message(1, &[]);
        truncated.pop();
        truncated.extend_from_slice(&[50, 200, 1, 2]);
        assert_eq!(
            Request::parse(&truncated),
            Err(DhcpError::TruncatedOption { code: 50 })
        );
        let no_type = {
            let mut bytes = client_message(1, &[]);
            bytes[HEADER_LEN + 4] = OPT_PAD;
            bytes[HEADER_LEN + 5] = OPT_PAD;
            bytes[HEADER_LEN + 6] = OPT_PAD;
            bytes
        };
        assert_eq!(Request::parse(&no_type), Err(DhcpError::NoMessageType));
        let bad_type = client_message(99, &[]);
        assert_eq!(Request::parse(&bad_type), Err(DhcpError::NoMessageType));
    }

    proptest::proptest! {
        /// Any datagram: parsing never panics, and whatever parses can be
        /// answered without panicking.
        #[test]
        fn random_datagrams_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600)) {
            let _ = Request::parse(&bytes);
            let mut framed = client_message(1, &[]);
            framed.truncate(HEADER_LEN + 4);
            framed.extend_from_slice(&bytes);
            if let Ok(request) = Request::parse(&framed) {
                if let Answer::Reply(kind) = decide(&request, Some(&lease()), SERVER) {
                    let reply = build_reply(&request, kind, &lease(), SERVER);
                    proptest::prop_assert!(Request::parse(&reply).is_err(), "a reply is not a request");
                }
            }
        }
    }
}
