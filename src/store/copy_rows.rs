//! The rows of the four tables in `COPY`'s text format. An empty field is an
//! empty string there; NULL would be `\N`, which escaping keeps out.

use chrono::Utc;

use super::write::Incoming;

/// A table a batch writes, with its columns in the order `rows` writes them.
pub struct Table {
    pub name: &'static str,
    pub columns: &'static str,
    /// Appends the rows of one order (an order has several items).
    pub rows: fn(&mut Vec<u8>, topic: &str, &Incoming),
}

/// Parents first: the children's foreign keys are checked row by row.
pub const TABLES: [Table; 4] = [
    Table {
        name: "orders",
        columns: "order_uid, track_number, entry, locale, internal_signature, customer_id, \
                  delivery_service, shardkey, sm_id, date_created, oof_shard, document, \
                  source_topic, source_partition, source_offset",
        rows: order_row,
    },
    Table {
        name: "deliveries",
        columns: "order_uid, name, phone, zip, city, address, region, email",
        rows: delivery_row,
    },
    Table {
        name: "payments",
        columns: "order_uid, transaction, request_id, currency, provider, amount, payment_dt, \
                  bank, delivery_cost, goods_total, custom_fee",
        rows: payment_row,
    },
    Table {
        name: "items",
        columns: "order_uid, position, chrt_id, track_number, price, rid, name, sale, size, \
                  total_price, nm_id, brand, status",
        rows: item_rows,
    },
];

fn order_row(row: &mut Vec<u8>, topic: &str, incoming: &Incoming) {
    let o = incoming.order.document();
    let created = o.date_created.at().with_timezone(&Utc).to_rfc3339();
    for text in [
        o.order_uid.as_str(),
        &o.track_number,
        &o.entry,
        &o.locale,
        &o.internal_signature,
        &o.customer_id,
        &o.delivery_service,
        &o.shardkey,
    ] {
        text_field(row, text.as_bytes());
    }
    number_field(row, o.sm_id);
    for text in [created.as_str(), &o.oof_shard] {
        text_field(row, text.as_bytes());
    }
    text_field(row, &incoming.json);
    text_field(row, topic.as_bytes());
    number_field(row, incoming.partition.into());
    number_field(row, incoming.offset);
    end_row(row);
}

fn delivery_row(row: &mut Vec<u8>, _: &str, incoming: &Incoming) {
    let o = incoming.order.document();
    let d = &o.delivery;
    for text in [
        o.order_uid.as_str(),
        &d.name,
        &d.phone,
        &d.zip,
        &d.city,
        &d.address,
        &d.region,
        &d.email,
    ] {
        text_field(row, text.as_bytes());
    }
    end_row(row);
}

fn payment_row(row: &mut Vec<u8>, _: &str, incoming: &Incoming) {
    let o = incoming.order.document();
    let p = &o.payment;
    for text in [
        o.order_uid.as_str(),
        &p.transaction,
        &p.request_id,
        &p.currency,
        &p.provider,
    ] {
        text_field(row, text.as_bytes());
    }
    number_field(row, p.amount);
    number_field(row, p.payment_dt);
    text_field(row, p.bank.as_bytes());
    for number in [p.delivery_cost, p.goods_total, p.custom_fee] {
        number_field(row, number);
    }
    end_row(row);
}

fn item_rows(row: &mut Vec<u8>, _: &str, incoming: &Incoming) {
    let o = incoming.order.document();
    let uid = o.order_uid.as_str().as_bytes();
    for (position, item) in o.items.iter().enumerate() {
        text_field(row, uid);
        number_field(row, position as i64);
        number_field(row, item.chrt_id);
        text_field(row, item.track_number.as_bytes());
        number_field(row, item.price);
        text_field(row, item.rid.as_bytes());
        text_field(row, item.name.as_bytes());
        number_field(row, item.sale);
        text_field(row, item.size.as_bytes());
        number_field(row, item.total_price);
        number_field(row, item.nm_id);
        text_field(row, item.brand.as_bytes());
        number_field(row, item.status);
        end_row(row);
    }
}

/// A field in `COPY`'s text format: only a backslash, a tab, a line feed or a
/// carriage return needs escaping. Validation leaves no control character in
/// an order's text, and canonical JSON escapes them, so most fields, the
/// document included, are copied as they are after one scan.
fn text_field(row: &mut Vec<u8>, text: &[u8]) {
    if memchr::memchr3(b'\\', b'\t', b'\n', text).is_some() || memchr::memchr(b'\r', text).is_some()
    {
        for &b in text {
            match b {
                b'\\' => row.extend_from_slice(b"\\\\"),
                b'\t' => row.extend_from_slice(b"\\t"),
                b'\n' => row.extend_from_slice(b"\\n"),
                b'\r' => row.extend_from_slice(b"\\r"),
                b => row.push(b),
            }
        }
    } else {
        row.extend_from_slice(text);
    }
    row.push(b'\t');
}

fn number_field(row: &mut Vec<u8>, number: i64) {
    row.extend_from_slice(itoa::Buffer::new().format(number).as_bytes());
    row.push(b'\t');
}

/// Each field ends with a tab; the row's last one ends with a line feed.
fn end_row(row: &mut Vec<u8>) {
    row.pop();
    row.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_fields_escape_only_what_copy_reads_specially() {
        let mut row = Vec::new();
        text_field(&mut row, "plain \"quoted\" é".as_bytes());
        text_field(&mut row, b"a\\b\tc\nd\re");
        number_field(&mut row, -42);
        end_row(&mut row);
        assert_eq!(
            String::from_utf8(row).unwrap(),
            "plain \"quoted\" é\ta\\\\b\\tc\\nd\\re\t-42\n"
        );
    }
}
